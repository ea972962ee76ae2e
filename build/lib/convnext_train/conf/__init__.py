"""The Hydra configs (a package so that Hydra finds them as `pkg://convnext_train.conf`, installed or not)."""
