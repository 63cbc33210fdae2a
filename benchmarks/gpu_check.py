"""GPU check: one script, one GPU, under ~5 minutes, one table.

    python benchmarks/gpu_check.py            # on a machine with CUDA
    python benchmarks/gpu_check.py --skip-run # the same without the tiny train.py + eval.py run

Rows:
- each stage's training step (1 pretrain: ITC+ITM+ITG; 2 caption; 3 instruct) at two sizes (tiny:
  the embedded default's Q-Former over 16 tokens of width 256 with the bootstrap LLM; BLIP-2: the
  12 x 768 Q-Former over 257 tokens of width 1408 with a Vicuna-7B-shaped frozen LLM in bf16),
  under bf16 autocast, once with the sdpa attention backend and once with xformers; the first
  step's loss and gradient norm of the two must agree within bf16 tolerance;
- generation (greedy, 16 new tokens) and yes/no scoring of a stage-3 model at both sizes;
- a 1-GPU DDP step over NCCL, whose gradients must equal those of the same step without DDP;
- `train.py --config tiny` on the GPU with trainer.precision=auto, then `eval.py --device cuda`.
Each row gives steps/s (or items/s), the peak GPU memory of that row and a verdict; the exit code
is 1 when a check failed. Weights are random: this checks that everything runs on CUDA and agrees,
not what a trained model scores. Without CUDA it prints one line and exits 0; the parts that can
run on a CPU are tested in tests/benchmarks/test_gpu_check.py (with "math" standing in for xformers).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from common import table

from expvl.configs.schema import BootstrapConfig, _tiny_qformer
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.generation import GenerationConfig
from expvl.models.llm import LLaMA, LLMConfig, SelfAttention
from expvl.models.qformer import QFormerConfig

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("pretrain", "caption", "instruct")
HEADER = ["check", "size", "backend", "rate", "peak GPU MiB", "result"]


@dataclass(frozen=True)
class Size:
    name: str
    qformer: QFormerConfig
    llm: LLMConfig
    tokens: int  # N cached image tokens
    width: int  # their width
    batch: int
    text: int  # text tokens per sample


def tiny() -> Size:
    return Size("tiny", replace(_tiny_qformer(), encoder_width=256), replace(BootstrapConfig().llm, vocab_size=1000),
                tokens=16, width=256, batch=16, text=32)


def blip2() -> Size:
    return Size("BLIP-2", QFormerConfig.from_name("blip2"), LLMConfig.from_name("vicuna-7b"),
                tokens=257, width=1408, batch=8, text=32)


class FixedWidth(torch.nn.Module):
    """Stand-in image tower for cached features: Blip2 reads only its width (features bypass it)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width


def frozen_llm(size: Size, device: torch.device) -> LLaMA:
    """The frozen decoder, built on `device` (a 7B one would take minutes to initialise on a CPU),
    bf16 on CUDA as the recipes load it."""
    with torch.device(device):
        llm = LLaMA(size.llm)
    return llm.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval().requires_grad_(False)


def set_llm_backend(model: Blip2, backend: str) -> None:
    """Point the (shared, prebuilt) LLM's attention at `backend`; the Q-Former is built with it."""
    for m in model.modules():
        if isinstance(m, SelfAttention):
            m.backend = backend


def build(stage: str, size: Size, device: torch.device, backend: str, llm: LLaMA | None) -> Blip2:
    """The stage's model with the same weights for every backend (seeded), trainable parts fp32."""
    torch.manual_seed(0)
    qcfg = replace(size.qformer, attention_backend=backend, hidden_dropout=0.0, attention_dropout=0.0)
    cfg = Blip2Config(stage=stage, qformer=qcfg, llm=None if stage == "pretrain" else size.llm)
    with torch.device(device):
        model = Blip2(cfg, vision=FixedWidth(size.width), llm=llm)
    set_llm_backend(model, backend)
    return model.train()


def batch(stage: str, size: Size, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    B, T = size.batch, size.text
    out = {"features": torch.randn(B, size.tokens, size.width, generator=g)}
    q_ids = torch.randint(3, size.qformer.vocab_size, (B, T), generator=g)
    q_ids[:, 0] = 1
    mask = torch.ones(B, T, dtype=torch.long)
    mask[B // 2:, T // 2:] = 0
    out |= {"q_ids": q_ids, "q_mask": mask}
    if stage != "pretrain":
        ids = torch.randint(3, size.llm.vocab_size, (B, T), generator=g)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : T // 4] = -100  # the prompt part carries no loss
        out |= {"ids": ids, "mask": mask.clone(), "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def loss(model: Blip2, stage: str, b: dict) -> torch.Tensor:
    embeds = model.embed_features(b["features"])
    if stage == "pretrain":
        return model.stage1_losses(embeds, b["q_ids"], b["q_mask"], dec_token_id=2, pad_token_id=0,
                                   generator=torch.Generator().manual_seed(0))["loss"]
    extra = {"instruction_ids": b["q_ids"], "instruction_mask": b["q_mask"]} if stage == "instruct" else {}
    return model.lm_loss(embeds, b["ids"], b["mask"], b["labels"], **extra)["loss"]


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict):
    """Peak GPU memory (MiB) allocated inside the block, into["peak_mib"]; None on a CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    into["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def train_steps(stage: str, size: Size, device: torch.device, backend: str, *, llm: LLaMA | None = None,
                steps: int = 5) -> dict:
    """`steps` timed training steps after one untimed: {"loss0", "grad_norm0", "steps_per_s", "peak_mib"};
    loss0 and grad_norm0 are those of the first step (before any update), for comparing backends."""
    out: dict = {}
    with peak_memory(device, out):
        model = build(stage, size, device, backend, llm)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        b = batch(stage, size, device)

        def step() -> torch.Tensor:
            with autocast(device):
                value = loss(model, stage, b)
            value.backward()
            return value

        first = step()
        out["loss0"] = first.item()
        out["grad_norm0"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
            opt.step()
            opt.zero_grad(set_to_none=True)
        synchronize(device)
        out["steps_per_s"] = steps / (time.perf_counter() - t0)
    return out


def agree(a: float, b: float, rtol: float = 3e-2, atol: float = 1e-3) -> bool:
    """Equal within bf16 tolerance (bf16 keeps 8 bits of mantissa: ~0.4 % per rounding, a few % over a step)."""
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def inference(size: Size, device: torch.device, backend: str, *, llm: LLaMA | None = None,
              new_tokens: int = 16) -> dict:
    """Greedy generation and yes/no scoring of a stage-3 model: tokens/s, images/s and sanity checks."""
    out: dict = {}
    with peak_memory(device, out):
        model = build("instruct", size, device, backend, llm).eval()
        b = batch("instruct", size, device)
        embeds = model.embed_features(b["features"])
        prompt_ids, prompt_mask = b["ids"][:, :8], torch.ones_like(b["ids"][:, :8])
        extra = {"instruction_ids": b["q_ids"], "instruction_mask": b["q_mask"]}
        cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        with autocast(device):
            synchronize(device)
            t0 = time.perf_counter()
            ids = model.generate(embeds, prompt_ids, prompt_mask, cfg, **extra)
            synchronize(device)
            t1 = time.perf_counter()
            scores = model.score_answers(embeds, prompt_ids, prompt_mask, [[5], [6]], **extra)  # "yes", "no"
            synchronize(device)
            t2 = time.perf_counter()
        B = embeds.shape[0]
        out["tokens_per_s"] = B * new_tokens / (t1 - t0)
        out["images_per_s"] = B / (t2 - t1)
        out["ok"] = (tuple(ids.shape) == (B, new_tokens) and tuple(scores.shape) == (B, 2)
                     and bool(torch.isfinite(scores).all()) and bool((scores <= 0).all()))
        del model
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StageOne(torch.nn.Module):
    """A module whose forward is the stage-1 loss, so that DDP sees the forward it has to prepare for."""

    def __init__(self, model: Blip2):
        super().__init__()
        self.model = model

    def forward(self, b: dict) -> torch.Tensor:
        return loss(self.model, "pretrain", b)


def ddp_step(device: torch.device, backend: str, size: Size | None = None) -> dict:
    """One stage-1 step through DistributedDataParallel in a 1-process group over `backend` (nccl on
    a GPU, gloo on a CPU): its gradients must equal the same step's without DDP (the all-reduce of
    one rank averages over one)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    size = size or tiny()
    out: dict = {}
    with peak_memory(device, out):
        plain = build("pretrain", size, device, "auto", None)
        wrapped = copy.deepcopy(plain)
        b = batch("pretrain", size, device)
        with autocast(device):
            ref = loss(plain, "pretrain", b)
        ref.backward()
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            ddp = DistributedDataParallel(_StageOne(wrapped), device_ids=[device.index or 0] if device.type == "cuda"
                                          else None)
            synchronize(device)
            t0 = time.perf_counter()
            with autocast(device):
                value = ddp(b)
            value.backward()
            synchronize(device)
            out["steps_per_s"] = 1 / (time.perf_counter() - t0)
        finally:
            dist.destroy_process_group()
        pairs = [(p.grad, q.grad) for p, q in zip(plain.parameters(), wrapped.parameters()) if p.grad is not None]
        out["ok"] = bool(pairs) and all(q is not None and torch.allclose(p, q, rtol=1e-3, atol=1e-5) for p, q in pairs)
        out["loss"] = value.item()
    return out


def tiny_run_commands(run_dir: Path, *, accelerator: str = "gpu", device: str = "cuda") -> list[list[str]]:
    """The tiny pipeline on the GPU (precision chosen by trainer.precision=auto), then its evaluation."""
    return [[sys.executable, str(ROOT / "train.py"), "--config", "tiny", f"run_dir={run_dir}",
             f"trainer.accelerator={accelerator}", "trainer.precision=auto"],
            [sys.executable, str(ROOT / "eval.py"), "--run", str(run_dir), "--device", device, "--limit", "16"]]


def tiny_run(timeout: int = 240) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "tiny"
        t0, log = time.perf_counter(), []
        for cmd in tiny_run_commands(run_dir):
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                  check=False)
            log.append(done.stderr[-400:])
            if done.returncode:
                return {"ok": False, "seconds": time.perf_counter() - t0,
                        "why": f"{Path(cmd[1]).name} exited {done.returncode}: {log[-1].strip()[-200:]}"}
        ok = (run_dir / "eval" / "metrics.json").exists()
        return {"ok": ok, "seconds": time.perf_counter() - t0, "why": "" if ok else "no eval/metrics.json"}


def xformers_missing() -> str:
    from expvl.models import attention
    return attention._XFORMERS_MISSING


def rows_for_training(size: Size, device: torch.device, backends: tuple[str, str], llm: LLaMA | None) -> list[list]:
    """Two rows per stage (one per backend), the second saying whether its first step agrees with the first's."""
    rows = []
    for stage in STAGES:
        runs = {}
        for backend in backends:
            r = runs[backend] = train_steps(stage, size, device, backend, llm=None if stage == "pretrain" else llm)
            result = f"loss {r['loss0']:.4f}, |grad| {r['grad_norm0']:.4f}"
            if len(runs) == 2:
                a, b = runs.values()
                same = agree(a["loss0"], b["loss0"]) and agree(a["grad_norm0"], b["grad_norm0"])
                result += f"; agrees with {backends[0]}: {'OK' if same else 'FAILED'}"
            rows.append([f"train {stage}", size.name, backend, f"{r['steps_per_s']:.2f} steps/s",
                         _mib(r["peak_mib"]), result])
    return rows


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-run", action="store_true", help="leave out the tiny train.py + eval.py run")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "BLIP-2"], choices=["tiny", "BLIP-2"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing checked")
        return 0
    device = torch.device("cuda")
    print(f"== gpu_check on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")
    missing = xformers_missing()
    backends = ("sdpa", "xformers") if not missing else ("sdpa",)
    rows = []
    if missing:
        rows.append(["xformers", "-", "xformers", "-", "-", f"FAILED: {missing}"])
    for size in [s for s in (tiny(), blip2()) if s.name in args.sizes]:
        llm = frozen_llm(size, device)
        rows += rows_for_training(size, device, backends, llm)
        for backend in backends:
            r = inference(size, device, backend, llm=llm)
            rows.append(["generate + yes/no", size.name, backend,
                         f"{r['tokens_per_s']:.0f} tokens/s, {r['images_per_s']:.0f} images/s", _mib(r["peak_mib"]),
                         "OK" if r["ok"] else "FAILED"])
        del llm
        torch.cuda.empty_cache()
    r = ddp_step(device, "nccl")
    rows.append(["DDP step, NCCL, 1 GPU", "tiny", "auto", f"{r['steps_per_s']:.2f} steps/s", _mib(r["peak_mib"]),
                 "OK: gradients equal the plain step's" if r["ok"] else "FAILED: gradients differ"])
    if not args.skip_run:
        r = tiny_run()
        rows.append(["train.py tiny + eval.py --device cuda", "tiny", "auto", f"{r['seconds']:.0f} s", "-",
                     "OK" if r["ok"] else f"FAILED: {r['why']}"])
    print(table(rows, HEADER))
    failed = [r for r in rows if "FAILED" in r[-1]]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
