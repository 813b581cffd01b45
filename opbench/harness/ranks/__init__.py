"""Devices as torch.distributed ranks: the plan of messages per split, the per-rank driver
and the launcher (local processes, or torchrun's env:// rendezvous)."""
