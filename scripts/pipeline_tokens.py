"""Tokens of 29 pipeline calls (demo, tiny aMUSEd, tiny Meissonic: batches, per-image seeds,
guidance off and scheduled, step cache, img2img, inpaint, outpaint, edit, callbacks), saved to
a file, so two versions of the code can be compared call by call:

    python scripts/pipeline_tokens.py before.pt      # with the older checkout on PYTHONPATH
    python scripts/pipeline_tokens.py after.pt
    python scripts/pipeline_tokens.py --compare before.pt after.pt
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if sys.argv[1] == "--compare":
    a, b = (torch.load(p, weights_only=False) for p in sys.argv[2:4])
    differ = [k for k in a if not torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))]
    print(f"compared {len(a)} calls; tokens differ in {len(differ)}: {differ}")
    sys.exit(1 if differ else 0)
sys.path.insert(0, str(ROOT / "tests"))
import musefast  # noqa: E402
from amused_tiny import make_tiny_amused  # noqa: E402

out = {}
torch.set_num_threads(1)
demo = musefast.load("demo")
img = demo("a red circle on the left", seed=1, num_steps=4, progress=False)[0]
mask = torch.zeros(img.size[1], img.size[0]); mask[:, : img.size[0] // 2] = 1
T = dict(output_type="tokens", progress=False)
out["demo_b2"] = demo(["a red circle on the left", "a blue square on the right"], seed=5, num_steps=6, **T)
out["demo_list"] = demo(["a red circle on the left", "a blue square on the right"], seed=[3, 9], num_steps=6, **T)
out["demo_g1"] = demo("a red circle on the left", seed=2, guidance_scale=1.0, num_steps=6, **T)
out["demo_cache"] = demo("a red circle on the left", seed=2, cache="fast", num_steps=8, **T)
out["demo_sched"] = demo("a red circle on the left", seed=2, guidance_schedule="cosine", guidance_interval=(0.2, 0.8), num_steps=6, **T)
out["demo_npi"] = demo("a red circle on the left", seed=2, num_images_per_prompt=3, num_steps=6, **T)
out["demo_inpaint"] = demo.inpaint(img, mask, "a green square on the right", seed=4, num_steps=6, **T)
out["demo_outpaint"] = demo.outpaint(img.crop((0, 0, img.size[0] - 8, img.size[1])), "a red circle on the left", right=8, seed=4, num_steps=6, **T)
out["demo_edit"] = demo.edit(img, "a blue circle on the left", iterations=3, seed=4, **T)
folder = Path(tempfile.mkdtemp()) / "amused"
make_tiny_amused(folder)
am = musefast.load(str(folder))
n = am.image_size
aimg = torch.rand(3, n, n, generator=torch.Generator().manual_seed(0))
amask = torch.zeros(n, n); amask[: n // 2] = 1
out["am_b2"] = am(["a cat", "a dog"], seed=5, num_inference_steps=6, **T)
out["am_list"] = am(["a cat", "a dog"], generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], num_inference_steps=6, **T)
out["am_npi"] = am("a cat", seed=5, num_images_per_prompt=2, num_inference_steps=6, **T)
out["am_g1"] = am("a cat", seed=5, guidance_scale=1.0, num_inference_steps=6, **T)
out["am_sched"] = am("a cat", seed=5, guidance_schedule="linear", guidance_interval=(0.1, 0.9), num_inference_steps=6, **T)
out["am_cache"] = am("a cat", seed=5, cache="fast", num_inference_steps=8, **T)
out["am_img2img"] = am("a cat", image=aimg, seed=5, strength=0.6, num_inference_steps=6, **T)
out["am_img2img_list"] = am(["a cat", "a dog"], image=aimg, seed=[5, 6], num_inference_steps=6, **T)
out["am_inpaint"] = am("a cat", image=aimg, mask_image=amask, seed=5, num_inference_steps=6, **T)
out["am_inpaint_any"] = am.inpaint(aimg, amask, "a cat", seed=5, num_inference_steps=6, **T)
out["am_size"] = am("a cat", seed=5, height=n // 2, width=n, num_inference_steps=4, **T)
out["am_micro"] = am("a cat", seed=5, micro_conditioning_aesthetic_score=3, micro_conditioning_crop_coord=(4, 4), temperature=(3, 1), num_inference_steps=4, **T)
def cb(pipe, i, t, kw):
    lat = kw["latents"].clone()
    if i == 1:
        lat[:, 0, 0] = 3
    return {"latents": lat}
out["am_callback"] = am("a cat", seed=5, num_inference_steps=5, callback_on_step_end=cb, **T)
seen = []
out["am_legacy_cb"] = am("a cat", seed=5, num_inference_steps=5, callback=lambda i, t, l: seen.append(int(l.sum())), **T)
out["am_legacy_seen"] = torch.tensor(seen)
me = musefast.load(str(ROOT / "tests/fixtures/meissonic/meissonic"))
mn = 256
mimg = torch.rand(3, mn, mn, generator=torch.Generator().manual_seed(0))
mmask = torch.zeros(mn, mn); mmask[:, : mn // 2] = 1
out["me_b2"] = me(["a cat", "a dog"], seed=3, height=mn, width=mn, num_inference_steps=6, **T)
out["me_cache"] = me("a cat", seed=3, height=mn, width=mn, num_inference_steps=8, cache="fast", **T)
out["me_g1"] = me("a cat", seed=3, height=mn, width=mn, num_inference_steps=4, guidance_scale=1.0, **T)
out["me_img2img"] = me("a cat", image=mimg, seed=3, num_inference_steps=6, **T)
out["me_inpaint"] = me("a cat", image=mimg, mask_image=mmask, seed=3, num_inference_steps=6, **T)
out = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))) for k, v in out.items()}
torch.save(out, sys.argv[1])
print("saved", len(out))
