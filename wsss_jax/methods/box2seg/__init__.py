"""Box2Seg (Kulharia et al., ECCV 2020): losses, three-branch model, stages
and report figures."""
