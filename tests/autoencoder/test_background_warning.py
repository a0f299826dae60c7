"""Stage-1 validation says when the model outputs background (a blank reconstruction)."""

from ldm_jax.autoencoder.task import background_warning
from tests.tiny import tiny_config


def test_warns_only_for_blank_reconstructions_after_the_first_evaluation():
    config = tiny_config()
    config.train.eval_every_steps = 100
    blank = dict(val_fg_fraction=0.12, val_recon_fg_fraction=0.001, val_dice=0.0,
                 val_psnr=17.3, val_psnr_blank=17.2)
    msg = background_warning(blank, 200, config)
    assert msg.startswith("warning: at step 200 the model outputs background")
    assert "0.10% of the reconstructed voxels" in msg and "12.00%" in msg
    assert "17.20 dB for a blank volume" in msg and "\n" not in msg
    assert background_warning(blank, 50, config) is None  # before the first evaluation
    learnt = dict(blank, val_recon_fg_fraction=0.10, val_dice=0.8)
    assert background_warning(learnt, 200, config) is None
    assert background_warning(dict(blank, val_fg_fraction=0.0), 200, config) is None
