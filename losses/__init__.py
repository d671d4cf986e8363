"""Losses as pure functions of tensors; each docstring carries its equation and its paper."""

from losses.sft import sft_loss

__all__ = ["sft_loss"]
