"""The Triton adapter: where tunevault meets ``@triton.autotune``."""
