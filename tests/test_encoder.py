"""The convolutional encoder: shapes, the STUDENT parameter count and training through SpaVAE."""

import numpy as np
import pytest
import torch

import spavae
from spavae.nn import ConvEncoder, GaussianEncoder


def n_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_conv_front_end_shapes_and_fewer_parameters():
    conv, dense = ConvEncoder(1011, 10), GaussianEncoder(1011, 10)
    assert conv.trunk[0].in_features == 2 * ((1011 - 4) // 2) == 1006
    assert n_trainable(dense) - n_trainable(conv) == (1011 - 1006) * 128 - (2 * 5 + 2)
    mean, var = conv(torch.randn(7, 1011))
    assert mean.shape == var.shape == (7, 10)
    with pytest.raises(ValueError, match="at least 6 genes"):
        ConvEncoder(5, 10)


def test_spavae_conv_matches_the_reported_parameter_count():
    adata = spavae.simulate_spatial_counts(n_rows=6, n_cols=6, n_genes=1011, n_domains=2, seed=0)
    # the report's model reads the genes (151510 has 4,634 spots, so input_axes='auto' would not project either)
    counts = {name: n_trainable(spavae.SpaVAE(adata, device="cpu", encoder=name, input_axes=None).module)
              for name in ("dense", "conv")}
    assert counts == {"dense": 272_571, "conv": 271_943}  # 151510 (1011 genes): the report's conv model, 271,943
    model = spavae.SpaVAE(adata, device="cpu", encoder="conv").train(max_epochs=1, progress=False)
    assert np.isfinite(model.get_latent_representation()).all()
    with pytest.raises(ValueError, match="encoder must be one of"):
        spavae.SpaVAE(adata, device="cpu", encoder="lstm")
