"""LPG (Xie et al., CVPR 2021): class-agnostic pseudo-mask generation from boxes."""
