"""PMM (Li et al., ICCV 2021): pseudo-mask matters."""
