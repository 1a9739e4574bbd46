"""The training loop: :func:`train` reads top to bottom, the way torchtitan's does.

Set-up (process groups, data, model, optimizer, resume) -> step loop (curriculum, forward/backward, optimizer
step, metrics, evaluation, checkpoint, preemption check) -> final plots. The CPU/GPU split lives in
:mod:`phsa_train.training.optimizer` and :func:`phsa_train.training.step.get_forward_backward`.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from megatron.core import parallel_state
from omegaconf import DictConfig, OmegaConf

from phsa_train.config import validate
from phsa_train.megatron.model import build_model, num_parameters, padded_vocab_size
from phsa_train.training import checkpoint as ckpt
from phsa_train.training.curriculum import build_curriculum
from phsa_train.training.data import batches, build_data
from phsa_train.training.distributed import init_distributed, init_model_parallel, prepare_device, shutdown
from phsa_train.training.errors import TrainingError
from phsa_train.training.metrics import MetricsLogger, StepReport
from phsa_train.training.optimizer import build_optimizer, lr_at_step
from phsa_train.training.phsa_monitor import PHSAMonitor
from phsa_train.training.preemption import PreemptionWatcher
from phsa_train.training.run_identity import check_same_run
from phsa_train.training.step import evaluate, get_forward_backward, train_step


def train(cfg: DictConfig, run_dir: Path) -> dict:
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset builder logs every index at INFO
    env = init_distributed()
    watcher = PreemptionWatcher()  # early: a signal during set-up stops the run after its first step
    validate(cfg, env.world_size)
    p, t = cfg.parallel, cfg.train
    init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                        p.cp_high_priority_stream)
    on_gpu = prepare_device(env, t.seed)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    if env.is_main:
        ckpt.check_writable(ckpt_dir)  # now, not at the first save `checkpoint.interval` steps later
    done = ckpt.latest_step(ckpt_dir) if str(cfg.checkpoint.resume).lower() != "false" else None
    if done is not None:  # one run per run dir: resume only the same run (ConfigError, one line, otherwise)
        saved = ckpt.saved_config(ckpt_dir, done)
        if saved is not None:
            check_same_run(ckpt.iter_dir(ckpt_dir, done), saved, OmegaConf.to_container(cfg, resolve=True))
    if done is not None and done >= t.steps:
        if env.is_main:
            print(f"[phsa_train] run complete: step {done}/{t.steps} is checkpointed; outputs in {run_dir} "
                  f"(checkpoints/, metrics.jsonl, loss.png, wandb/); raise train.steps to train on", flush=True)
        shutdown()
        return {"step": done, "loss": None, "valid_loss": None, "run_dir": str(run_dir), "preempted": False}

    data = build_data(cfg, env, lambda v: padded_vocab_size(v, cfg.model.make_vocab_size_divisible_by,
                                                            p.tensor_model_parallel_size))
    precision = t.precision if t.precision != "auto" else ("bf16" if on_gpu else "fp32")
    model = build_model(cfg, data.vocab_size, torch.bfloat16 if precision == "bf16" else torch.float32)
    optimizer = build_optimizer(cfg, model, on_gpu)  # optimizer.model: what the forward runs on (DDP on GPU)
    forward_backward = get_forward_backward(on_gpu)
    curriculum = build_curriculum(cfg)
    state = ckpt.restore(cfg, ckpt_dir, model, optimizer, tokenizer_vocab=data.tokenizer.vocab_size)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    logger = MetricsLogger(run_dir, enabled=env.is_main, wandb_cfg=cfg.logging.wandb, config=config_dict,
                           run_name=cfg.run_name, resume_id=state.wandb_run_id, first_step=state.step,
                           tags=(cfg.attention.name, cfg.model.name, cfg.curriculum.name))
    state.wandb_run_id = logger.run_id
    if env.is_main:
        print(_banner(cfg, num_parameters(model), env, precision, run_dir, state.step), flush=True)

    train_iter = batches(data.train, start_sample=state.consumed_samples, global_batch_size=t.global_batch_size,
                         micro_batch_size=t.micro_batch_size, data=data,
                         reset_attention_mask=cfg.data.reset_attention_mask, device=env.device)
    stop_at = min(t.steps, t.exit_after_steps) if t.exit_after_steps else t.steps
    report = StepReport(cfg, env.world_size, data.vocab_size, state.step, stop_at, on_gpu)
    phsa_monitor = PHSAMonitor(cfg, model, data, env.device, curriculum, env.is_main)
    valid_loss = loss = None
    skipped = 0  # steps with a non-finite loss, up to train.max_skipped_steps

    def evaluate_now():
        return evaluate(optimizer.model, forward_backward, data, cfg, env.device)

    optimizer.model.train()
    if t.eval_interval and state.step == 0:  # the starting value every later validation is compared with
        valid_loss = evaluate_now()
        logger.log(0, StepReport.add_valid({"train/tokens_seen": 0}, valid_loss),
                   f"step      0/{t.steps} | valid {valid_loss:.4f}")
    while state.step < stop_at:
        step_start = time.time()
        sparsity = curriculum.apply(model, state.step)
        lr = lr_at_step(state.step, t)
        optimizer.set_lr(lr)
        optimizer.zero_grad()
        loss = train_step(optimizer.model, forward_backward, train_iter, cfg, env.device)
        # Megatron's bf16 optimizer would apply a NaN gradient (no loss scaler to catch it): no update then.
        grad_norm = optimizer.step() if _finite_everywhere(loss, env.device) else float("nan")
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            skipped += 1
            _non_finite(loss, grad_norm, state.step + 1, skipped, t.max_skipped_steps, env.is_main)
        state.step += 1
        state.consumed_samples += t.global_batch_size

        metrics = report.metrics(state.step, loss, lr, grad_norm, time.time() - step_start, sparsity)
        metrics.update(phsa_monitor.metrics(state.step, loss, sparsity))
        if t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.steps):
            valid_loss = evaluate_now()
            StepReport.add_valid(metrics, valid_loss)
        logger.log(state.step, metrics, report.console(state.step, metrics, sparsity))

        preempted = watcher.should_stop()
        if state.step % cfg.checkpoint.interval == 0 or state.step == stop_at or preempted:
            state.extra = {"curriculum": curriculum.state()}
            ckpt.save(ckpt_dir, model, optimizer, state, config_dict, keep_last=cfg.checkpoint.keep_last,
                      optimizer_sharding=cfg.checkpoint.optimizer_sharding)
            if env.is_main:
                print(f"[phsa_train] saved checkpoint step {state.step} -> {ckpt_dir}", flush=True)
        if preempted:
            if env.is_main and state.step < stop_at:  # a signal at the last step needs no second start
                watcher.mark_requeue(run_dir, state.step)
            break

    logger.finish_run(plots=cfg.logging.plots)
    if env.is_main:
        print(_summary(cfg, run_dir, ckpt_dir, state.step, loss, valid_loss, report, logger), flush=True)
    shutdown()
    return {"step": state.step, "loss": loss, "valid_loss": valid_loss, "run_dir": str(run_dir),
            "preempted": watcher.stopped}


def _finite_everywhere(loss: float, device) -> bool:
    """Whether the loss is finite on every rank: all of them must take, or skip, the optimizer step together."""
    flag = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


def _non_finite(loss: float, grad_norm: float, step: int, skipped: int, allowed: int, say: bool) -> None:
    """A step whose loss or gradient norm is NaN/inf: its update was not applied. Skip it while at most
    ``allowed`` such steps happened in this start, else stop (nothing of it is saved)."""
    what = f"non-finite loss {loss} or grad norm {grad_norm} at step {step}"
    if skipped > allowed:
        raise TrainingError(f"{what}: stopping ({skipped} such steps > train.max_skipped_steps={allowed}); "
                            "the update was skipped and nothing was saved, the last checkpoint is intact")
    if say:
        print(f"[phsa_train] {what}: update skipped ({skipped} of train.max_skipped_steps={allowed})", flush=True)


def _summary(cfg, run_dir: Path, ckpt_dir: Path, step: int, loss, valid_loss, report, logger) -> str:
    """The end of a run: where it got and where everything is."""
    ended = "done" if step >= cfg.train.steps else "stopped"
    lines = [f"[phsa_train] {ended} at step {step}/{cfg.train.steps}: train loss "
             + (f"{loss:.4f}" if loss is not None else "-")
             + (f", valid loss {valid_loss:.4f} (ppl {math.exp(min(valid_loss, 50)):.1f})" if valid_loss is not None
                else "") + f", {report.mean_tokens_per_sec(step):,.0f} tok/s",
             f"  checkpoints  {ckpt_dir}",
             f"  metrics      {run_dir / 'metrics.jsonl'}" + (f", plots {run_dir / 'loss.png'}" if cfg.logging.plots
                                                               else "")]
    if logger.wandb_dir:
        lines.append(f"  W&B          {logger.wandb_dir} ({cfg.logging.wandb.mode}; `wandb sync` it to upload)"
                     if cfg.logging.wandb.mode == "offline" else f"  W&B          run {logger.run_id}")
    lines.append(f"  evaluate     python -m phsa_train.eval eval.checkpoint={ckpt_dir}")
    return "\n".join(lines)


def _banner(cfg, n_params: int, env, precision: str, run_dir: Path, step: int) -> str:
    p = cfg.parallel
    return (f"[phsa_train] {cfg.run_name}: {n_params / 1e6:.2f}M params/rank, world {env.world_size} "
            f"(tp {p.tensor_model_parallel_size} pp {p.pipeline_model_parallel_size} cp "
            f"{p.context_parallel_size} dp {parallel_state.get_data_parallel_world_size()}), {precision} on "
            f"{env.device.type}, run dir {run_dir}" + (f", resumed at step {step}" if step else ""))
