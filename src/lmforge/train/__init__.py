"""lmforge.train: the one training loop, its optimizer/schedule, checkpoints, logging, torchrun setup."""
