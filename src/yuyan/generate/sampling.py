"""Logits processors and token sampling, batched with per-row settings.

Every processor takes logits (B, V) and per-row parameter tensors (B,), so one batch may mix greedy rows,
hot rows, top-k rows and penalised rows (what the server's continuous-batching scheduler needs). A row whose
setting is "off" (top_k 0, top_p 1, min_p 0, penalties neutral) passes through unchanged. The order follows
Hugging Face's: penalties, temperature, top-k, top-p, min-p, then sample. Greedy rows (temperature 0) take
`argmax` of the logits as given, so a default row is bit-identical to plain greedy decoding. A row's
`logit_bias` (OpenAI's: token id -> a number in [-100, 100] added to its logit; -100 bans a token in
practice, +100 forces it) comes first, before the penalties, for greedy rows too.
`SamplingParams` is one request's settings; `stack_params` turns a list of them into `SamplingTensors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from yuyan.errors import UserError


@dataclass
class SamplingParams:
    """One request's sampling settings. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the prompt or output
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the output
    presence_penalty: float = 0.0  # subtracted once if the token occurred in the output
    seed: int | None = None  # reproducible sampling for this row
    n: int = 1  # samples per prompt (checked here; the engine expands them)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

    def validate(self) -> SamplingParams:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}; use 0 for greedy"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}; use 1 to turn it off"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}; use 0 to turn it off"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}; use 0 to turn it off"),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}; use 1 to turn it off",
            ),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"invalid sampling setting: {msg}")
        self._check_bias()
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            v = getattr(self, name)
            if v != v or v in (float("inf"), float("-inf")):
                raise UserError(f"invalid sampling setting: {name} must be a finite number, got {v}")
        return self

    def _check_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise UserError(
                f"invalid sampling setting: logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers"
            )
        for k, v in bias.items():
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise UserError(
                    f"invalid sampling setting: logit_bias key {k!r} is not a token id (an integer >= 0)"
                )
            if isinstance(v, bool) or not isinstance(v, int | float) or not -100 <= v <= 100:
                raise UserError(
                    f"invalid sampling setting: logit_bias of token {k} must be a number in [-100, 100], got {v!r}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias (OpenAI documents none; vLLM bounds none)


def bias_ids(bias: dict) -> dict[int, float]:
    """A logit_bias from JSON or TOML, whose keys are strings of digits ("50256"), with integer keys; a key
    that is not an integer is left as it is, for `validate` to name."""
    out = {}
    for k, v in bias.items():
        out[int(k) if isinstance(k, str) and k.strip().isdigit() else k] = v
    return out


@dataclass
class SamplingTensors:
    """Per-row settings of a batch as tensors (B,), plus Python flags to skip processors nobody uses."""

    temperature: torch.Tensor  # (B,) float
    top_k: torch.Tensor  # (B,) long
    top_p: torch.Tensor  # (B,) float
    min_p: torch.Tensor  # (B,) float
    repetition: torch.Tensor  # (B,) float
    frequency: torch.Tensor  # (B,) float
    presence: torch.Tensor  # (B,) float
    greedy: torch.Tensor  # (B,) bool
    bias: torch.Tensor | None = None  # (B, V) the rows' logit_bias, dense; None when no row has one
    generators: list[torch.Generator | None] = field(default_factory=list)
    use_penalties: bool = False
    use_top_k: bool = False
    use_top_p: bool = False
    use_min_p: bool = False
    all_greedy: bool = False

    def select(self, index: list[int]) -> SamplingTensors:
        """Rows `index` (e.g. after finished rows leave the batch, or beams reorder)."""
        idx = torch.tensor(index, dtype=torch.long, device=self.temperature.device)
        t = {
            k: getattr(self, k).index_select(0, idx)
            for k in (
                "temperature",
                "top_k",
                "top_p",
                "min_p",
                "repetition",
                "frequency",
                "presence",
                "greedy",
            )
        }
        flags = {
            k: getattr(self, k)
            for k in ("use_penalties", "use_top_k", "use_top_p", "use_min_p", "all_greedy")
        }
        bias = None if self.bias is None else self.bias.index_select(0, idx)
        return SamplingTensors(**t, bias=bias, generators=[self.generators[i] for i in index], **flags)


def make_generator(seed: int | None, device: torch.device | str | None = None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device or "cpu")
    g.manual_seed(int(seed))
    return g


def stack_params(
    params: list[SamplingParams],
    device: torch.device | str | None = None,
    generators: list[torch.Generator | None] | None = None,
    vocab_size: int | None = None,
) -> SamplingTensors:
    """Stack per-request settings into per-row tensors. A row with a seed gets its own generator unless
    `generators` is given (the engine passes them to give n samples of one prompt distinct streams).
    `vocab_size` is needed when a row has a logit_bias (it becomes a dense (B, V) tensor)."""
    for p in params:
        p.validate()
    bias = None
    if any(p.logit_bias for p in params):
        if vocab_size is None:
            raise ValueError("stack_params needs vocab_size for rows with a logit_bias")
        bias = torch.zeros(len(params), vocab_size, device=device)
        for b, p in enumerate(params):
            for tok, v in (p.logit_bias or {}).items():
                if tok >= vocab_size:
                    raise UserError(
                        f"logit_bias names token {tok}, outside the model's vocabulary of {vocab_size}"
                    )
                bias[b, tok] = float(v)

    def f(name: str, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

    if generators is None:
        generators = [make_generator(p.seed, device) for p in params]
    return SamplingTensors(
        temperature=f("temperature"),
        top_k=f("top_k", torch.long),
        top_p=f("top_p"),
        min_p=f("min_p"),
        repetition=f("repetition_penalty"),
        frequency=f("frequency_penalty"),
        presence=f("presence_penalty"),
        greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
        bias=bias,
        generators=list(generators),
        use_penalties=any(
            p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params
        ),
        use_top_k=any(p.top_k > 0 and not p.greedy for p in params),
        use_top_p=any(p.top_p < 1 and not p.greedy for p in params),
        use_min_p=any(p.min_p > 0 and not p.greedy for p in params),
        all_greedy=all(p.greedy for p in params),
    )


# ---------------------------------------------------------------------------------------------- processors
def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Penalise tokens seen before. counts (B, V): occurrences in the generated output so far.

    repetition (HF/CTRL rule): a seen token's logit is divided by r when positive, multiplied by r when
    negative; "seen" includes the prompt when prompt_mask (B, V) bool is given (HF and vLLM semantics).
    frequency: logit -= f * count; presence: logit -= p * (count > 0) (OpenAI semantics, output only).
    """
    counts = counts.to(logits.dtype)
    seen = counts > 0
    rep_seen = seen if prompt_mask is None else seen | prompt_mask
    r = repetition[:, None].to(logits.dtype)
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(rep_seen, penalised, logits)
    return logits - frequency[:, None].to(logits.dtype) * counts - presence[:, None].to(logits.dtype) * seen


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide row b by temperature[b]; rows with temperature 0 (greedy) are left unchanged."""
    t = temperature[:, None].to(logits.dtype)
    return torch.where(t > 0, logits / torch.where(t > 0, t, torch.ones_like(t)), logits)


def top_k_mask(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k[b] largest logits (ties at the k-th value kept, like HF); k 0 keeps all."""
    V = logits.shape[-1]
    kmax = int(k.max())
    if kmax <= 0:
        return logits
    kk = k.clamp(max=V)
    top = logits.topk(min(kmax, V), dim=-1).values  # (B, kmax) sorted descending
    thresh = top.gather(1, (kk - 1).clamp(min=0)[:, None])  # (B, 1): the k-th largest
    remove = (logits < thresh) & (kk > 0)[:, None]
    return logits.masked_fill(remove, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p[b] (HF's rule:
    drop tokens whose ascending cumulative probability is <= 1 - p; the top token always stays); p 1 keeps all."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cum <= (1 - p[:, None].to(cum.dtype))
    remove_sorted[:, -1] = False
    remove_sorted &= (p < 1)[:, None]
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_mask(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below p[b] times the row's top probability; p 0 keeps all."""
    probs = logits.float().softmax(-1)
    thresh = p[:, None].float() * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < thresh, float("-inf"))


def process(
    logits: torch.Tensor,
    st: SamplingTensors,
    counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """logit_bias, then all processors in HF order; processors that no row uses are skipped."""
    if st.bias is not None:
        logits = logits + st.bias.to(logits.dtype)
    if st.use_penalties and counts is not None:
        logits = apply_penalties(logits, counts, st.repetition, st.frequency, st.presence, prompt_mask)
    if st.all_greedy:
        return logits
    logits = apply_temperature(logits, st.temperature)
    if st.use_top_k:
        logits = top_k_mask(logits, torch.where(st.greedy, torch.zeros_like(st.top_k), st.top_k))
    if st.use_top_p:
        logits = top_p_mask(logits, torch.where(st.greedy, torch.ones_like(st.top_p), st.top_p))
    if st.use_min_p:
        logits = min_p_mask(logits, torch.where(st.greedy, torch.zeros_like(st.min_p), st.min_p))
    return logits


def sample(
    logits: torch.Tensor, greedy: torch.Tensor, generators: list[torch.Generator | None] | None = None
) -> torch.Tensor:
    """Next tokens (B,): argmax for greedy rows, a draw from softmax(logits) for the others.

    Rows with a generator draw from it (reproducible per row, whatever else is in the batch); rows without
    draw from the global RNG.
    """
    tokens = logits.max(-1).indices  # argmax (first of ties too), ~3x faster than argmax() on CPU
    if bool(greedy.all()):
        return tokens
    B = logits.shape[0]
    probs = logits.float().softmax(-1)
    gens = generators or [None] * B
    sampled_rows = (~greedy).nonzero().flatten().tolist()
    free = [b for b in sampled_rows if gens[b] is None]
    if free:
        idx = torch.tensor(free, device=logits.device)
        tokens[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
    for b in sampled_rows:
        if gens[b] is not None:
            tokens[b] = torch.multinomial(probs[b], 1, generator=gens[b])[0]
    return tokens


def logprobs_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_softmax (B, V), top-k logprobs (B, k), their token ids (B, k)) of the model's raw distribution."""
    lp = logits.float().log_softmax(-1)
    if k <= 0:
        empty = lp[:, :0]
        return lp, empty, empty.long()
    top = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return lp, top.values, top.indices


__all__ = [
    "SamplingParams",
    "SamplingTensors",
    "stack_params",
    "bias_ids",
    "MAX_LOGIT_BIAS",
    "make_generator",
    "apply_penalties",
    "apply_temperature",
    "top_k_mask",
    "top_p_mask",
    "min_p_mask",
    "process",
    "sample",
    "logprobs_topk",
]
