"""parallel: the only package that imports torch.distributed (mesh, plans, collectives, DCP)."""
