"""Child process of test_cuda_raw_op_checks_raise_not_crash: call the raw custom op (no
Python-side checks) with inconsistent inputs; each call must raise RuntimeError."""
import torch

from dino_scale.ops import ms_deform_attn_cuda

ms_deform_attn_cuda.load()
v = torch.randn(1, 24, 2, 8, device="cuda")
shapes = torch.tensor([[4, 5], [2, 2]], device="cuda")
starts = torch.tensor([0, 20], device="cuda")
loc = torch.rand(1, 3, 2, 2, 2, 2, device="cuda")
w = torch.rand(1, 3, 2, 2, 2, device="cuda")
for args in ((v, shapes[:1], starts[:1], loc, w), (v, shapes, starts, loc, w[..., :1].contiguous()),
             (v.half(), shapes, starts, loc.half(), w)):
    try:
        with torch.no_grad():
            torch.ops.dino_scale.ms_deform_attn_forward(*args)
        print("NO ERROR", flush=True)
    except RuntimeError as exc:
        print("RAISED", str(exc).splitlines()[0][:120], flush=True)
