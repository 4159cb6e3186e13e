"""The transformer: parameter counts vs transformers, SDPA vs explicit attention, cached vs uncached decoding,
config validation, the FLOP estimate (checked against torch's own FLOP counter) and the recipe switches
(QK-norm against transformers' Qwen3, the ReLU² MLP, soft-capped logits and zero-initialised projections
against their formulas)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_config
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from yuyan.model.flops import flops_per_token, num_params
from yuyan.model.kv_cache import KVCache
from yuyan.model.presets import PRESETS, preset
from yuyan.model.transformer import ModelConfig, Transformer


def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def test_gpt2_preset_param_count_equals_transformers():
    ours = _meta(Transformer, preset("gpt2"))
    theirs = _meta(GPT2LMHeadModel, GPT2Config())  # the 124M GPT-2 config
    n = sum(p.numel() for p in theirs.parameters())
    assert num_params(ours) == n == 124_439_808
    ours_m = _meta(Transformer, preset("gpt2-medium"))
    theirs_m = _meta(GPT2LMHeadModel, GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    assert num_params(ours_m) == sum(p.numel() for p in theirs_m.parameters())


def test_llama_1b_preset_param_count_equals_transformers():
    c = preset("llama-1b")
    hf = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        tie_word_embeddings=True,
    )
    assert num_params(_meta(Transformer, c)) == sum(
        p.numel() for p in _meta(LlamaForCausalLM, hf).parameters()
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    m = _meta(Transformer, preset(name))
    assert num_params(m) > 0 and m.lm_head.weight.shape == (m.config.vocab_size, m.config.d_model)


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "llama-mqa", "llama-mha"])
@torch.no_grad()
def test_sdpa_matches_explicit_attention(kind):
    family = kind.split("-")[0]
    n_kv = {"llama-gqa": 2, "llama-mqa": 1, "llama-mha": 4}.get(kind)
    torch.manual_seed(0)
    model = Transformer(tiny_config(family, **({"n_kv_head": n_kv} if n_kv else {}))).eval()
    x = torch.randint(0, 512, (3, 40))
    weights: list = []
    a, b = model(x), model(x, attn_weights=weights)
    assert (a - b).abs().max().item() < 1e-5
    assert len(weights) == 2 and weights[0].shape == (3, 4, 40, 40)
    assert torch.allclose(weights[0].sum(-1), torch.ones(3, 4, 40)) and weights[0].triu(1).abs().max() == 0
    # the masked (cached) path too: explicit vs SDPA on the same cache contents
    for explicit in (False, True):
        cache = KVCache(model.config, 3)
        model(x[:, :30], cache=cache)
        cache.advance(30)
        out = model(x[:, 30:], cache=cache, attn_weights=[] if explicit else None)
        assert (out - a[:, 30:]).abs().max().item() < 1e-5


SWITCHES = dict(qk_norm=True, ffn="relu2_mlp", logit_softcap=3.0)  # every forward-changing switch at once


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt2-switches", "llama-switches"])
@torch.no_grad()
def test_cached_decoding_matches_uncached_with_ragged_rows(family):
    torch.manual_seed(0)
    model = Transformer(
        tiny_config(family.split("-")[0], **(SWITCHES if "switches" in family else {}))
    ).eval()
    lengths = [7, 3, 5]  # each row's prompt length: a batch of different per-row lengths
    seqs = [torch.randint(0, 512, (n,)).tolist() for n in lengths]
    cache = KVCache(model.config, batch=3, capacity=40)
    # prefill the longest prompt length; the padded tails are overwritten because lengths say so
    padded = torch.tensor([s + [0] * (max(lengths) - len(s)) for s in seqs])
    logits = model(padded, cache=cache)
    cache.lengths = torch.tensor(lengths)
    nxt = [logits[b, n - 1] for b, n in enumerate(lengths)]
    for _ in range(12):
        for b in range(3):  # the oracle: each row's whole sequence without a cache
            ref = model(torch.tensor([seqs[b]]))[0, -1]
            assert (nxt[b] - ref).abs().max().item() < 1e-5
            seqs[b].append(int(ref.argmax()))
        step = torch.tensor([[s[-1]] for s in seqs])
        logits = model(step, cache=cache)
        cache.advance(1)
        nxt = list(logits[:, -1])
    assert cache.lengths.tolist() == [n + 12 for n in lengths]


@torch.no_grad()
def test_cache_reorder_and_copy_row():
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama")).eval()
    x = torch.randint(0, 512, (2, 6))
    cache = KVCache(model.config, 2)
    model(x, cache=cache)
    cache.advance(6)
    nxt = torch.tensor([[5], [9]])
    want = model(torch.cat([x, nxt], 1))[:, -1]
    flipped = KVCache(model.config, 2)
    flipped.copy_row(0, cache, 1)
    flipped.copy_row(1, cache, 0)
    cache.reorder(torch.tensor([1, 0]))
    for c in (cache, flipped):
        got = model(nxt.flip(0), cache=c)[:, -1]
        assert (got - want.flip(0)).abs().max().item() < 1e-5


def test_learned_positions_refuse_beyond_context():
    model = Transformer(tiny_config("gpt2", block_size=16))
    with pytest.raises(ValueError, match="beyond the context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(ffn="relu"), "ffn must be one of gelu_mlp, swiglu, relu2_mlp"),
        (dict(dropout=1.0), r"dropout must be a finite number in \[0, 1\), got 1.0"),
        (dict(dropout=float("nan")), "dropout must be a finite number"),
        (dict(norm_eps=0.0), "norm_eps must be a finite number > 0"),
        (dict(norm_eps=float("nan")), "norm_eps must be a finite number > 0, got nan"),
        (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0, got inf"),
        (dict(rope_theta="1e4"), "rope_theta must be a finite number"),
        (dict(logit_softcap=0.0), "logit_softcap must be a finite number > 0"),
        (dict(logit_softcap=float("nan")), "logit_softcap must be a finite number > 0"),
        (dict(norm="batchnorm"), "norm must be layernorm or rmsnorm"),
        (dict(pos="alibi"), "pos must be learned or rope"),
        (dict(n_head=4, n_kv_head=3), r"n_head \(4\) must be a multiple of n_kv_head \(3\)"),
        (dict(n_kv_head=0), "n_kv_head=0"),
        (dict(vocab_size=-1), "vocab_size=-1"),
        (dict(d_model=32.0), "d_model=32.0"),
        (dict(pos="rope", head_dim=7), "rope needs an even head_dim"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**kw)


def test_config_json_with_nan_is_refused_by_field_name(tmp_path, tokenizer):
    import json

    from yuyan.errors import UserError
    from yuyan.model.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "m", Transformer(tiny_config("gpt2", tokenizer.vocab_size)), tokenizer)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "norm_eps": float("nan")}))  # writes NaN
    with pytest.raises(UserError, match="norm_eps must be a finite number > 0, got nan"):
        load_checkpoint(path, verify=False)


def test_config_dict_round_trip_and_unknown_keys():
    c = tiny_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown model config keys \['n_embd'\]"):
        ModelConfig.from_dict({**c.to_dict(), "n_embd": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt5")
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        Transformer(tiny_config("llama", rope_scaling={"rope_type": "yarn", "factor": 2.0}))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_flops_per_token_against_torch_flop_counter(family):
    # FlopCounterMode counts every matmul (the explicit attention path: it does not see CPU SDPA), with full
    # (non-causal) T x T attention; our estimate counts the causal half and includes the vector parameters
    # (norms, biases) at 2 FLOPs each, which are ~1% here
    model = Transformer(tiny_config(family, n_layer=2, d_model=64, block_size=128))
    T = 128
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, T, dtype=torch.long), attn_weights=[])
    c = model.config
    full_attn_extra = c.n_layer * c.n_head * c.head_dim * 2 * T * T  # the upper triangle FlopCounter counts
    measured_per_token = (counter.get_total_flops() - full_attn_extra) / T
    assert flops_per_token(model, T) == pytest.approx(measured_per_token, rel=0.02)
    assert flops_per_token(model, T, training=True) == 3 * flops_per_token(model, T)
    # the 124M GPT-2: ~6N training FLOPs per token plus attention, N counted with the lm_head matmul
    g = _meta(Transformer, preset("gpt2"))
    assert 6 * 124e6 < flops_per_token(g, 1024, training=True) < 6 * 124e6 * 1.3


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama-softcap"])
def test_fused_loss_matches_plain_cross_entropy(family, monkeypatch):
    """model(x, targets=y) — lm_head fused with cross-entropy, in row blocks — equals F.cross_entropy on
    the full logits (soft-capped ones too), loss and every parameter's gradient, with ignored targets."""
    from yuyan.model import loss as L

    torch.manual_seed(0)
    kw = {"logit_softcap": 0.2} if family.endswith("softcap") else {}  # a cap small enough to bind
    model = Transformer(tiny_config(family.split("-")[0], **kw)).double()
    x = torch.randint(0, model.config.vocab_size, (3, 11))
    y = torch.roll(x, -1, 1)
    y[0, :4] = -100
    monkeypatch.setattr(L, "BLOCK_BYTES", 5 * 4 * model.config.vocab_size)  # blocks of 5 of the 33 rows
    fused = model(x, targets=y)
    fused.mul(0.5).backward()
    g_fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    plain.mul(0.5).backward()
    # the fused path keeps float32 logits even for a float64 model, hence 1e-6
    assert abs(fused.item() - plain.item()) < 1e-6
    for n, p in model.named_parameters():
        assert torch.allclose(g_fused[n], p.grad, atol=1e-7, rtol=1e-5), n
    with torch.no_grad():  # evaluation: loss only
        assert abs(model(x, targets=y).item() - plain.item()) < 1e-6
    assert torch.isnan(model(x, targets=torch.full_like(y, -100)))  # like torch: no counted target


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tied_lookup_gradient_is_autograds_bitwise(precision, monkeypatch):
    """With tied embeddings the token lookup adds its rows into the fused loss's gradient of the shared
    weight (loss.tied_lookup) instead of autograd's second dense gradient: every gradient is bitwise that of
    the plain lookup, in fp32 and under bf16 autocast, over two accumulated backward passes with a scaled
    loss and with repeated tokens (rows summed several times); the bf16 gradient of lm_head cast to float32
    by vocab chunks equals the one cast whole."""
    from yuyan.model import loss as L
    from yuyan.model import transformer as T

    def grads(tied: bool, chunk_rows: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = Transformer(tiny_config("gpt2", vocab_size=97, logit_softcap=3.0))
        taken = []

        def spy(*args):
            taken.append(L.tied_lookup(*args))
            return taken[-1]

        monkeypatch.setattr(T, "tied_lookup", spy if tied else lambda *a: None)
        monkeypatch.setattr(L, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(L, "BLOCK_BYTES", 40 * 4 * 97)  # blocks of 40 of the 96 rows
        g = torch.Generator().manual_seed(1)
        for scale in (1.0, 0.3):
            x = torch.randint(0, 13, (3, 32), generator=g)  # 13 distinct tokens over 96 positions
            y = torch.roll(x, -1, 1)
            y[0, :5] = -100
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(x, targets=y)
            (loss * scale).backward()
        assert len(taken) == (2 if tied else 0) and None not in taken
        return {n: p.grad for n, p in model.named_parameters()}

    plain, tied = grads(False, 10**9), grads(True, 10**9)
    for n in plain:
        assert torch.equal(plain[n], tied[n]), n
    if precision == "bf16":
        for n, g in grads(True, 16).items():  # 97 rows in chunks of 16
            assert torch.equal(g, tied[n]), n


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("tied", [True, False])
def test_kept_loss_buffers_change_no_result_and_are_reused(precision, tied, monkeypatch):
    """The fused loss's large CPU buffers kept across steps (loss.kept): losses, gradients and weights over
    three AdamW steps are bitwise those of fresh buffers, in fp32 and under bf16 autocast, tied or not,
    with logits in blocks; the lm_head gradient is the same memory from step to step once .grad was set to
    None, and neither a gradient still being accumulated into nor one a caller kept is written over."""
    from yuyan.model import loss as L

    monkeypatch.setattr(L, "CHUNK_ROWS", 16)
    monkeypatch.setattr(L, "BLOCK_BYTES", 40 * 4 * 97)  # blocks of 40 of the 96 rows

    def run(keep: bool):
        monkeypatch.setattr(L, "KEEP_BUFFERS", keep)
        torch.manual_seed(0)
        model = Transformer(tiny_config("gpt2", vocab_size=97, logit_softcap=3.0, tie_embeddings=tied))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        g = torch.Generator().manual_seed(1)
        out, ptrs, held = [], [], None
        for step in range(3):
            for _ in range(2 if step == 0 else 1):  # step 0 accumulates into a live .grad
                x = torch.randint(0, 13, (3, 32), generator=g)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = model(x, targets=torch.roll(x, -1, 1))
                loss.backward()
                out.append(loss.detach())
            ptrs.append(model.lm_head.weight.grad.data_ptr())
            out += [p.grad.clone() for p in model.parameters()]
            if step == 1:  # a caller keeps this step's gradient: the next step may not reuse its memory
                held = model.lm_head.weight.grad
                held_copy = held.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert held is not None and torch.equal(held, held_copy)
        return out + [p.detach() for p in model.parameters()], ptrs

    (fresh, _), (mine, ptrs) = run(False), run(True)
    assert len(fresh) == len(mine) and all(torch.equal(a, b) for a, b in zip(fresh, mine, strict=True))
    assert ptrs[0] == ptrs[1] != ptrs[2]  # reused after set_to_none, not while the caller holds step 1's


def test_tied_lookup_without_the_loss_gradient_is_torchs_embedding_gradient():
    """When nothing handed over a loss gradient, the lookup's backward is torch's embedding backward."""
    from yuyan.model import loss as L

    emb = torch.nn.Embedding(11, 4)
    idx = torch.tensor([[1, 3, 3], [0, 1, 10]])
    out, _ = L.tied_lookup(idx, emb, torch.nn.Linear(4, 11, bias=False)) or (None, None)
    assert out is None  # untied: the plain lookup
    head = torch.nn.Linear(4, 11, bias=False)
    head.weight = emb.weight
    out, tie = L.tied_lookup(idx, emb, head)
    w = torch.randn(2, 3, 4)
    (out * w).sum().backward()
    mine = emb.weight.grad.clone()
    emb.weight.grad = None
    (emb(idx) * w).sum().backward()
    assert torch.equal(mine, emb.weight.grad) and tie.grad is None
    with torch.no_grad():
        assert L.tied_lookup(idx, emb, head) is None


def test_fused_loss_falls_back_for_wrapped_heads():
    from yuyan.model.lora import apply_lora

    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", logit_softcap=2.0))
    apply_lora(model, rank=2, alpha=4, targets=["lm_head"])
    torch.nn.init.normal_(model.lm_head.lora_B.weight)  # a non-zero adapter must count in the loss
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    y = torch.roll(x, -1, 1)
    plain = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert torch.allclose(model(x, targets=y), plain)
    base = 2.0 * torch.tanh(torch.nn.functional.linear(model.hidden(x), model.lm_head.weight) / 2.0)
    assert not torch.allclose(plain, torch.nn.functional.cross_entropy(base.flatten(0, 1), y.flatten()))


@torch.no_grad()
def test_qk_norm_matches_transformers_qwen3():
    """QK-norm (RMSNorm over each head's q and k, before RoPE) is Qwen3's: the same weights give the same
    logits as transformers' Qwen3ForCausalLM, with GQA, untied embeddings and no biases."""
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            attention_bias=False,
            tie_word_embeddings=False,
        )
    ).eval()
    for n, p in hf.named_parameters():  # norm gains away from 1, so a skipped norm would show
        if n.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
    ours = Transformer(tiny_config("llama", qk_norm=True, head_dim=8, norm_eps=1e-6)).eval()
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert set(sd) == set(ours.state_dict())  # HF's names: self_attn.q_norm / k_norm
    ours.load_state_dict(sd)
    x = torch.randint(0, 512, (2, 24))
    assert (ours(x) - hf(x).logits).abs().max().item() < 1e-5
    ours.config.qk_norm = False  # the reference differs without them
    for block in ours.layers:
        block.self_attn.qk_norm = False
    assert (ours(x) - hf(x).logits).abs().max().item() > 1e-3


@torch.no_grad()
def test_relu2_mlp_softcap_and_zero_init_against_their_formulas():
    torch.manual_seed(0)
    model = Transformer(tiny_config("gpt2", ffn="relu2_mlp", logit_softcap=0.2)).eval()
    mlp = model.layers[0].mlp
    assert not hasattr(mlp, "gate_proj") and mlp.up_proj.out_features == 4 * 32  # d_ff = 4 d_model
    h = torch.randn(3, 5, 32)
    up = h @ mlp.up_proj.weight.T + mlp.up_proj.bias
    want = torch.clamp(up, min=0) ** 2 @ mlp.down_proj.weight.T + mlp.down_proj.bias  # relu(x W1)^2 W2
    assert torch.allclose(mlp(h), want, atol=1e-6)
    # soft-capped logits: 0.2 tanh(z / 0.2), z the head's plain logits, so |logits| < 0.2
    x = torch.randint(0, 512, (2, 12))
    z = model.hidden(x) @ model.lm_head.weight.T
    logits = model(x)
    assert torch.allclose(logits, 0.2 * torch.tanh(z / 0.2), atol=1e-6) and logits.abs().max() < 0.2
    assert z.abs().max() > 0.4  # the cap binds somewhere, so the check means something
    # zero-initialised o_proj and down_proj: every block starts as the identity
    zero = Transformer(tiny_config("llama", zero_init_residual=True)).eval()
    residual = [m.weight for b in zero.layers for m in (b.self_attn.o_proj, b.mlp.down_proj)]
    assert all(torch.count_nonzero(w) == 0 for w in residual)
    assert torch.count_nonzero(zero.layers[0].self_attn.q_proj.weight) > 0
    assert torch.allclose(zero.hidden(x), zero.norm(zero.embed_tokens(x)), atol=1e-6)
    plain = Transformer(tiny_config("llama")).eval()
    assert torch.count_nonzero(plain.layers[0].mlp.down_proj.weight) > 0


def test_switches_that_hugging_face_cannot_express_refuse_export():
    from yuyan.errors import UserError
    from yuyan.model.hf import hf_family

    assert hf_family(tiny_config("llama", zero_init_residual=True)) == "llama"  # only the start differs
    assert hf_family(tiny_config("llama", qk_norm=True)) == "qwen3"  # Qwen3 is Llama with QK-norm
    with pytest.raises(UserError, match="logit_softcap"):  # only Gemma soft-caps, with its other switches
        hf_family(tiny_config("llama", logit_softcap=30.0))
    with pytest.raises(UserError, match="ffn=relu2_mlp"):
        hf_family(tiny_config("llama", ffn="relu2_mlp"))


@torch.no_grad()
def test_switched_model_decodes_like_its_forward():
    """The decode core (cached, with the decode layout), its logprobs and speculative decoding with the int8
    draft all see the switched model's own logits: soft-capped (a cap that binds), QK-normed, ReLU²."""
    from yuyan.generate import GenerationConfig, generate
    from yuyan.generate.core import Decoder
    from yuyan.generate.speculative import Speculator, int8_draft

    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", qk_norm=True, ffn="relu2_mlp", logit_softcap=0.2)).eval()
    greedy = dict(temperature=0, stop_token_ids=[], max_new_tokens=8)
    out = generate(model, None, [[1, 2, 3]], GenerationConfig.from_dict(dict(logprobs=2, **greedy)))[0][0]
    seq = [1, 2, 3]
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        ref = model(torch.tensor([seq]))[0, -1].log_softmax(-1)  # capped: every logprob near log(1/V)
        assert lp.token_id == tok and abs(lp.logprob - float(ref[tok])) < 1e-5
        seq.append(tok)
    cfg = GenerationConfig.from_dict(dict(speculative=3, **greedy))
    core = Decoder(model, None, 1, 3 + 8 + 3 + 1, Speculator(int8_draft(model), 3))
    row = core.admit([[1, 2, 3]], [cfg])[0][0]
    while core.rows:
        core.step()
    assert row.completion().token_ids == out.token_ids
