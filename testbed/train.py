"""Train the testbed's video DiT with flow matching on procedurally generated moving shapes.

    python -m testbed.train --out testbed/checkpoint --device cuda --steps 6000 --max-seconds 400
    python -m testbed.train --tiny --steps 20 --device cpu --out /tmp/tiny        # smoke test

Flow matching (rectified flow, as FlowMatchEulerDiscreteScheduler samples it): ``x_t = (1 - t) x0 + t noise``
with ``t ~ U(0, 1)``, the model gets ``timestep = 1000 t`` and regresses the velocity ``noise - x0``. 10 %
of the conditions are replaced by the null condition (all-zero tokens) for classifier-free guidance. AdamW
with linear warmup then a constant learning rate, so stopping at step K (``--max-seconds``) leaves the same
weights as ``--steps K``; the shipped weights are the EMA. Everything is seeded by ``--seed``.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from . import videos as V
from .sample import model_input

CONFIG = dict(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=48, in_channels=4, out_channels=3,
              text_dim=V.TEXT_DIM, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
TINY = dict(CONFIG, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, freq_dim=16)


def build(config: dict, seed: int):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    return WanTransformer3DModel(**config)


def flow_batch(cond, gen, p_uncond: float, t_shift: float = 1.0):
    """One training batch: (noisy videos, timesteps in [0, 1000], condition tokens, velocity target).
    ``t_shift`` s > 1 moves the uniform t towards noise, t = s u / (1 + (s - 1) u), the same map as the
    scheduler's ``shift`` applies to its sigmas."""
    dev = cond.device
    x0 = V.render(cond, gen)
    b = x0.shape[0]
    eps = torch.randn(x0.shape, generator=gen, device=dev)
    t = torch.rand(b, generator=gen, device=dev)
    t = t_shift * t / (1 + (t_shift - 1) * t)
    drop = torch.rand(b, generator=gen, device=dev) < p_uncond
    tt = t.view(b, 1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * eps
    return xt, t * 1000, V.encode(cond, drop), eps - x0


def loss_fn(model, batch, autocast: bool, in_channels: int):
    xt, ts, tokens, target = batch
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        pred = model(hidden_states=model_input(xt, in_channels), timestep=ts, encoder_hidden_states=tokens,
                     return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target)


def train(config: dict, steps: int, batch: int = 128, lr: float = 5e-4, warmup: int = 200, ema: float = 0.999,
          p_uncond: float = 0.1, seed: int = 0, device="cpu", max_seconds: float | None = None,
          log_every: int = 100, verbose: bool = True, init=None, compile: bool = False,
          t_shift: float = 1.0):
    """Returns (ema_model, log dict). ``log['curve']``: rows (step, mean loss since last row, seconds).
    ``init``: a checkpoint folder to start from (model and EMA; a later training stage), instead of ``seed``'s
    random init. ``compile``: torch.compile the training forward (falls back to eager if that fails)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build(config, seed)
    if init is not None:
        from .sample import load
        model.load_state_dict(load(init).state_dict())
    model = model.to(dev).train()
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    gen = torch.Generator(dev).manual_seed(seed + 1)
    autocast = dev.type == "cuda"
    curve, window, start, step = [], [], time.perf_counter(), 0
    params, ema_params = list(model.parameters()), list(ema_model.parameters())
    forward = torch.compile(model) if compile else model
    while step < steps:
        cond = V.random_conditions(batch, gen)
        data = flow_batch(cond, gen, p_uncond, t_shift)
        try:
            loss = loss_fn(forward, data, autocast, config["in_channels"])
        except Exception as e:  # noqa: BLE001 - a failed compile must not lose the run
            if forward is model:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {e}); training eager", flush=True)
            forward = model
            loss = loss_fn(forward, data, autocast, config["in_channels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        window.append(loss.detach())
        if step % log_every == 0 or step == steps:
            mean = float(torch.stack(window).mean())
            seconds = time.perf_counter() - start
            curve.append((step, mean, round(seconds, 2)))
            window = []
            if verbose:
                print(f"step {step:6d}  loss {mean:.5f}  {seconds:7.1f} s", flush=True)
            if max_seconds is not None and seconds > max_seconds:
                break
    if window:
        curve.append((step, float(torch.stack(window).mean()), round(time.perf_counter() - start, 2)))
    log = dict(steps_done=step, seconds=time.perf_counter() - start, final_loss=curve[-1][1], curve=curve,
               config=config, batch=batch, lr=lr, warmup=warmup, ema=ema, p_uncond=p_uncond, seed=seed,
               device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
               params=sum(p.numel() for p in params), init=str(init) if init else None, compile=compile,
               t_shift=t_shift)
    return ema_model, log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the checkpoint (save_pretrained) and train_log.json")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop at the first log row past this time")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--tiny", action="store_true", help="a tiny config (tests, smoke runs)")
    ap.add_argument("--init", default=None, help="start from this checkpoint folder (a second training stage)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    ap.add_argument("--t-shift", type=float, default=1.0, help="shift of the training t towards noise")
    args = ap.parse_args(argv)
    model, log = train(TINY if args.tiny else CONFIG, args.steps, args.batch, args.lr, args.warmup, args.ema,
                       args.p_uncond, args.seed, args.device, args.max_seconds, args.log_every, init=args.init,
                       compile=args.compile, t_shift=args.t_shift)
    log["command"] = "python -m testbed.train " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    model.to("cpu").save_pretrained(str(out), safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"saved {out}: {log['steps_done']} steps in {log['seconds']:.1f} s, final loss {log['final_loss']:.5f}")


if __name__ == "__main__":
    main()
