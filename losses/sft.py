import torch


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the response tokens, summed (the trainer divides by the count).

        L = - sum_{t in response} log p(y_t | x, y_<t)

    ``token_logps`` are log p of each target token, ``mask`` is 1 on response tokens. Returning the
    sum, not the mean, lets the trainer normalise by the number of response tokens in the whole
    global batch, so gradient accumulation and the number of ranks do not change the gradient.
    """
    return -(token_logps * mask).sum()
