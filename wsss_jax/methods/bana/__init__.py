"""BANA (Oh, Kim, Ham, CVPR 2021): background-aware pooling, pseudo-labels
Y_crf / Y_ret, the noise-aware loss, stages and report figures."""
