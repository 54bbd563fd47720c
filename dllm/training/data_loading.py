"""Batches for fine-tuning: shuffled per epoch and split across data-parallel ranks, each item
carrying its record index so that a bad loss can name its examples."""
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from dllm import distributed


class Indexed(Dataset):
    """Adds the record index to each item, so a bad loss can name its examples."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (i, *self.dataset[i])


def train_loader(dataset, batch_size, seed, num_workers):
    """Shuffled per epoch (set_epoch), a disjoint share per data-parallel rank."""
    sampler = DistributedSampler(
        dataset, num_replicas=distributed.dp_size(), rank=distributed.dp_rank(), shuffle=True, seed=seed,
        drop_last=True,
    )
    # its own generator: worker seeding must not draw from the global RNG that resume restores
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def val_loader(dataset, batch_size, num_workers):
    """Every record exactly once across ranks (no padding repeats), so metrics equal a 1-process run."""
    shard = Subset(dataset, range(distributed.dp_rank(), len(dataset), distributed.dp_size()))
    return DataLoader(shard, batch_size=batch_size, num_workers=num_workers)


def trim_padding(batch):
    """Drop the padding columns every row of the batch shares: same loss, less compute."""
    width = max(1, int(batch[2].sum(1).max()))
    return [t[:, :width] for t in batch]
