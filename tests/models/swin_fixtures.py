"""A small Swin backbone for the Swin tests (test_swin.py, test_swin_weights.py)."""
import torch

from dino_scale.models import swin as S

SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)


def small(**kw):
    torch.manual_seed(0)
    cfg = dict(SMALL)
    cfg.update(kw)
    return S.SwinTransformerDetection(**cfg)


def randomize_norms(model, seed=1):
    """LayerNorms default to (1, 0); give them random affine params so loading is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
