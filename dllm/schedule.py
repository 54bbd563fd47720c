"""Learning-rate and rate-loss-weight schedules, as functions of fractional epochs."""
import math


def learning_rate(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up, then half-cycle cosine from lr down to min_lr (the reference's schedule)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def rate_loss_weight(epoch: float, lambda_active: float, epochs: float) -> float:
    """lambda_t: sine-annealed from 0 at the start to lambda_active at the end of training."""
    return lambda_active * math.sin(0.5 * math.pi * min(epoch / epochs, 1.0))
