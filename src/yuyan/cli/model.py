"""`yuyan convert from-hf|to-hf|to-gguf SRC OUT`: move models between Hugging Face folders, our
checkpoints and GGUF files.

All are thin calls into `yuyan.model.hf` / `yuyan.model.gguf`: from-hf loads an HF folder (or downloads
`hf:NAME`) and saves our checkpoint folder; to-hf loads any model spec and writes a folder that transformers
opens; to-gguf writes one file that llama.cpp opens.
"""

from __future__ import annotations

import typer

from yuyan.cli.app import app
from yuyan.cli.common import FORCE, load_model

convert_app = typer.Typer(
    help="Convert models between Hugging Face folders, yuyan checkpoints and GGUF files.",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")


@convert_app.command("from-hf")
def from_hf_cmd(
    src: str = typer.Argument(..., help="Hugging Face model folder (gpt2, llama, qwen2, mistral) or hf:NAME"),
    out: str = typer.Argument(..., help="checkpoint folder to write (replaced atomically)"),
    force: bool = FORCE,
) -> None:
    """Import a Hugging Face model into a yuyan checkpoint folder.

    Example: yuyan convert from-hf ./gpt2-hf ./ckpt/gpt2
    """
    from yuyan.fsutil import check_output_dir
    from yuyan.model.checkpoint import save_checkpoint
    from yuyan.model.flops import num_params
    from yuyan.model.hf import download, load_hf

    check_output_dir(out, force=force, sources=(None if src.startswith("hf:") else src,))
    folder = download(src[3:]) if src.startswith("hf:") else src
    lm = load_hf(folder)
    gen = lm.meta.get("generation_config")
    path = save_checkpoint(
        out,
        lm.model,
        lm.tokenizer,
        meta=lm.meta,
        generation_config=gen,
        extra_tensors=lm.extra_tensors,  # a classifier's head, when the folder holds one
        force=force,
        sources=(folder,),
    )
    n = num_params(lm.model)
    print(f"wrote {path} ({lm.meta['hf_model_type']}, {n / 1e6:.2f}M parameters)")


@convert_app.command("to-hf")
def to_hf_cmd(
    src: str = typer.Argument(..., help="our checkpoint folder (or any model spec yuyan.load accepts)"),
    out: str = typer.Argument(..., help="Hugging Face folder to write (replaced atomically)"),
    family: str = typer.Option(None, help="expected model_type (gpt2|llama|qwen2); default: from the config"),
    force: bool = FORCE,
) -> None:
    """Export a model to a folder that transformers' AutoModelForCausalLM and AutoTokenizer open.

    Example: yuyan convert to-hf ./ckpt/demo ./demo-hf
    """
    import json

    from yuyan.fsutil import check_output_dir
    from yuyan.model.hf import export_hf

    check_output_dir(out, force=force, sources=(None if src.startswith("hf:") else src,))
    lm = load_model(src)
    path = export_hf(lm, None, out, family=family, force=force)
    written = json.loads((path / "config.json").read_text(encoding="utf-8"))["model_type"]
    print(f"wrote {path} (model_type {written})")


@convert_app.command("to-gguf")
def to_gguf_cmd(
    src: str = typer.Argument(..., help="our checkpoint folder (or any model spec yuyan.load accepts)"),
    out: str = typer.Argument(..., help="GGUF file to write (replaced atomically)"),
    outtype: str = typer.Option("f32", help="tensor type of the matrices: f32|f16|bf16|q8_0"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
) -> None:
    """Export a GPT-2- or Llama-family model to a GGUF file for llama.cpp, Ollama and LM Studio.

    Example: yuyan convert to-gguf ./ckpt/demo demo.gguf --outtype q8_0
    """
    from yuyan.model.gguf import check_gguf_output, check_outtype, export_gguf, gguf_family

    check_outtype(outtype)
    check_gguf_output(out, force=force, source=None if src.startswith("hf:") else src)
    lm = load_model(src)
    path = export_gguf(lm, out, outtype=outtype, force=force)
    print(f"wrote {path} (arch {gguf_family(lm.model.config)}, {outtype})")
