"""Interpretability: attention maps, logit lens, per-token surprise, input attribution (PNG and HTML)."""

from yuyan.interpret.attention import attention_weights, render_attention
from yuyan.interpret.attribution import Decision, integrated_gradients, occlusion, render_attribution
from yuyan.interpret.logit_lens import logit_lens, render_logit_lens
from yuyan.interpret.surprise import render_surprise, surprise

__all__ = [
    "attention_weights",
    "render_attention",
    "logit_lens",
    "render_logit_lens",
    "surprise",
    "render_surprise",
    "Decision",
    "integrated_gradients",
    "occlusion",
    "render_attribution",
]
