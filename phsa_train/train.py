"""Pretraining entry point: ``python -m phsa_train.train [hydra overrides]`` (or ``launch/pretrain.sh``).

Reads top to bottom: distributed set-up -> data -> model -> optimizer -> resume -> loop (curriculum,
forward/backward, grad sync, clip, step, log, eval, checkpoint, preemption check) -> final save.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from megatron.core import parallel_state
from omegaconf import DictConfig, OmegaConf

from phsa_train import checkpoint as ckpt
from phsa_train import cpu_compat
from phsa_train.builders import batches, build_data, build_optimizer, lr_at_step
from phsa_train.config import register_configs, validate
from phsa_train.curriculum import LossSpikeDetector, build_curriculum
from phsa_train.distributed import init_distributed, init_model_parallel, prepare_device, shutdown
from phsa_train.megatron.core_attention import pop_path_counts
from phsa_train.metrics import MetricsLogger, flops_per_token
from phsa_train.model import build_model, num_parameters, padded_vocab_size
from phsa_train.preemption import PreemptionWatcher
from phsa_train.selection_stats import selection_stats

register_configs()
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for MFU


def loss_func(loss_mask: torch.Tensor, n_tokens_global: torch.Tensor, output: torch.Tensor):
    """Per-token losses [b, s_local] -> this rank's share of the micro-batch mean loss.

    Under CP each rank holds a slice of every sequence: dividing the local sum by the *global* token
    count (times cp, since gradients are averaged over the DP x CP group) makes CP=N equal CP=1.
    """
    cp = parallel_state.get_context_parallel_world_size()
    local_sum = (output.float() * loss_mask).sum()
    loss = local_sum * cp / n_tokens_global
    reported = local_sum.detach().clone()
    if cp > 1:
        dist.all_reduce(reported, group=parallel_state.get_context_parallel_group())
    return loss, {"loss": reported / n_tokens_global}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    n_tokens = batch["loss_mask"].sum().float()
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   extra_block_kwargs={"attention_bias": batch["token_info"]})
    return output, functools.partial(loss_func, batch["loss_mask"].float(), n_tokens)


def evaluate(model, forward_backward, data, cfg, device) -> float:
    """Mean validation loss over ``train.eval_iters`` fixed global batches (the same ones every time)."""
    t = cfg.train
    it = batches(data.valid, start_sample=0, global_batch_size=t.global_batch_size,
                 micro_batch_size=t.micro_batch_size, data=data,
                 reset_attention_mask=cfg.data.reset_attention_mask, device=device)
    model.eval()
    n_micro = t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for _ in range(t.eval_iters):
            out = forward_backward(forward_step_func=forward_step, data_iterator=it, model=[model],
                                   num_microbatches=n_micro, seq_length=cfg.data.seq_len,
                                   micro_batch_size=t.micro_batch_size, forward_only=True)
            total += sum(r["loss"] for r in out) / max(1, len(out))
    model.train()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total / (t.eval_iters * parallel_state.get_data_parallel_world_size())).item()


def run_dirs(cfg) -> tuple[Path, Path]:
    run_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
    return run_dir, Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


def train(cfg: DictConfig) -> dict:
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset builder logs every index at INFO
    env = init_distributed()
    watcher = PreemptionWatcher()  # early: a signal during set-up stops the run after its first step
    validate(cfg, env.world_size)
    p = cfg.parallel
    init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size)
    on_gpu = prepare_device(env, cfg.train.seed)
    run_dir, ckpt_dir = run_dirs(cfg)
    t = cfg.train

    data = build_data(cfg, env, lambda v: padded_vocab_size(v, cfg.model.make_vocab_size_divisible_by,
                                                            p.tensor_model_parallel_size))
    precision = t.precision if t.precision != "auto" else ("bf16" if on_gpu else "fp32")
    model = build_model(cfg, data.vocab_size, torch.bfloat16 if precision == "bf16" else torch.float32)
    inner = model
    model, optimizer, megatron_opt = build_optimizer(cfg, model, on_gpu)
    if on_gpu:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward_backward = get_forward_backward_func()
    else:
        forward_backward = cpu_compat.forward_backward_local
    curriculum = build_curriculum(cfg)

    state = ckpt.TrainState()
    resume = str(cfg.checkpoint.resume).lower()
    last = ckpt.latest_step(ckpt_dir) if resume != "false" else None
    if resume == "true" and last is None:
        raise FileNotFoundError(f"checkpoint.resume=true but no checkpoint under {ckpt_dir}")
    if last is not None:
        state = ckpt.load(ckpt_dir, last, inner, optimizer, megatron_optimizer=megatron_opt)
    elif cfg.checkpoint.init_from:
        init_from = str(cfg.checkpoint.init_from)
        if init_from.startswith("hf:"):  # a Hugging Face Qwen3 directory, converted on the fly (weights only)
            from phsa_train.convert import load_hf_into_model

            load_hf_into_model(inner, Path(init_from[3:]).expanduser(), cfg, tokenizer_vocab=data.tokenizer.vocab_size)
        else:
            src = Path(init_from)
            ckpt.load(src, ckpt.latest_step(src), inner, optimizer, megatron_optimizer=megatron_opt,
                      load_optimizer=False)
        if megatron_opt:  # the fp32 main params were copied from the random init when the optimizer was built
            optimizer.reload_model_params()

    config_dict = OmegaConf.to_container(cfg, resolve=True)
    logger = MetricsLogger(run_dir, enabled=env.is_main, wandb_cfg=cfg.logging.wandb, config=config_dict,
                           run_name=cfg.run_name, resume_id=state.wandb_run_id,
                           tags=(cfg.attention.name, cfg.model.name, cfg.curriculum.name))
    state.wandb_run_id = logger.run_id
    n_params = num_parameters(inner)
    if env.is_main:
        print(f"[phsa_train] {cfg.run_name}: {n_params / 1e6:.2f}M params/rank, world {env.world_size} "
              f"(tp {p.tensor_model_parallel_size} pp {p.pipeline_model_parallel_size} cp "
              f"{p.context_parallel_size} dp {parallel_state.get_data_parallel_world_size()}), {precision} on "
              f"{env.device.type}, run dir {run_dir}" + (f", resumed at step {state.step}" if last else ""),
              flush=True)

    dp = parallel_state.get_data_parallel_world_size()
    n_micro = t.global_batch_size // (t.micro_batch_size * dp)
    train_iter = batches(data.train, start_sample=state.consumed_samples, global_batch_size=t.global_batch_size,
                         micro_batch_size=t.micro_batch_size, data=data,
                         reset_attention_mask=cfg.data.reset_attention_mask, device=env.device)
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    stop_at = min(t.steps, t.exit_after_steps) if t.exit_after_steps else t.steps
    peak = next((v for k, v in PEAK_FLOPS.items() if on_gpu and k in torch.cuda.get_device_name()), None)
    last_saved, valid_loss, loss, t0 = state.step, None, None, time.time()
    cur = cfg.curriculum
    stats_on = curriculum.phsa and cur.stats_interval > 0 and p.context_parallel_size == 1
    probe = next(batches(data.valid, start_sample=0, global_batch_size=t.micro_batch_size * dp,
                         micro_batch_size=t.micro_batch_size, data=data,
                         reset_attention_mask=cfg.data.reset_attention_mask, device=env.device)) if stats_on else None
    prev_selection, spike = None, LossSpikeDetector(cur.loss_spike_factor)

    model.train()
    if t.eval_interval and state.step == 0:  # the starting value every later validation is compared with
        valid_loss = evaluate(model, forward_backward, data, cfg, env.device)
        logger.log(0, {"valid/loss": valid_loss, "valid/ppl": float(torch.tensor(valid_loss).exp()),
                       "train/tokens_seen": 0}, f"step      0/{t.steps} | valid {valid_loss:.4f}")
    while state.step < stop_at:
        step_start = time.time()
        sparsity = curriculum.apply(inner, state.step)
        lr = lr_at_step(state.step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if megatron_opt:
            model.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(forward_step_func=forward_step, data_iterator=train_iter, model=[model],
                               num_microbatches=n_micro, seq_length=cfg.data.seq_len,
                               micro_batch_size=t.micro_batch_size, forward_only=False)
        loss = torch.stack([r["loss"] for r in out]).mean() if out else torch.zeros((), device=env.device)
        if megatron_opt:
            _, grad_norm, _ = optimizer.step()
        else:
            cpu_compat.allreduce_grads(inner)
            grad_norm = cpu_compat.clip_grad_norm(inner, t.clip_grad)
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss = loss.item() / dp
        if not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(float(grad_norm or 0.0)))):
            raise FloatingPointError(f"non-finite loss {loss} or grad norm {grad_norm} at step {state.step + 1} "
                                     f"(rank {env.rank}); the optimizer update was skipped and nothing was saved")
        if not megatron_opt:
            optimizer.step()
        state.step += 1
        state.consumed_samples += t.global_batch_size
        step_time = time.time() - step_start

        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": float(grad_norm or 0.0),
                   "train/tokens_seen": state.step * tokens_per_step, "perf/step_time_s": step_time,
                   "perf/tokens_per_sec": tokens_per_step / step_time,
                   "perf/tokens_per_sec_per_gpu": tokens_per_step / step_time / env.world_size,
                   **sparsity.metrics()}
        if curriculum.phsa:
            calls = pop_path_counts(inner)
            metrics.update({"phsa/dense_calls": calls["dense"], "phsa/sparse_calls": calls["sparse"]})
        if spike.update(state.step, sparsity.phase, loss):
            metrics["phsa/loss_spike"] = 1.0
            if env.is_main:
                print(f"[phsa_train] WARNING: loss spike at step {state.step} ({loss:.4f} vs running mean "
                      f"{spike.mean_before:.4f}) {state.step - spike.changed_at} steps after the switch to "
                      f"phase '{sparsity.phase}'", flush=True)
        if stats_on and state.step % cur.stats_interval == 0:
            stats, prev_selection = selection_stats(inner, probe, cfg.attention, curriculum.schedule.final_topk,
                                                    cur.stats_queries, prev_selection)
            metrics.update(stats)
            pop_path_counts(inner)  # the probe forward is not training work
        if peak:
            fpt = flops_per_token(cfg, cfg.data.seq_len, data.vocab_size, sparsity.attended_tokens(cfg.data.seq_len))
            metrics["perf/mfu"] = fpt * metrics["perf/tokens_per_sec_per_gpu"] / peak
        if t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.steps):
            valid_loss = evaluate(model, forward_backward, data, cfg, env.device)
            metrics.update({"valid/loss": valid_loss, "valid/ppl": float(torch.tensor(valid_loss).exp())})
        console = None
        if state.step % t.log_interval == 0 or state.step in (1, stop_at) or "valid/loss" in metrics:
            eta = (time.time() - t0) / max(1, state.step - last_saved) * (stop_at - state.step) if state.step else 0
            console = (f"step {state.step:>6}/{t.steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {float(grad_norm or 0):.3f}"
                       f" | {metrics['perf/tokens_per_sec']:,.0f} tok/s | {step_time:.2f} s/step{sparsity.console()}"
                       + (f" | mfu {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else "")
                       + (f" | valid {valid_loss:.4f} ppl {metrics['valid/ppl']:.1f}" if "valid/loss" in metrics else "")
                       + f" | eta {eta:.0f}s")
        logger.log(state.step, metrics, console)

        preempted = watcher.should_stop()
        if state.step % cfg.checkpoint.interval == 0 or state.step == stop_at or preempted:
            state.extra = {"curriculum": curriculum.state()}
            ckpt.save(ckpt_dir, inner, optimizer, state, config_dict, megatron_optimizer=megatron_opt,
                      keep_last=cfg.checkpoint.keep_last, optimizer_sharding=cfg.checkpoint.optimizer_sharding)
            if env.is_main:
                print(f"[phsa_train] saved checkpoint step {state.step} -> {ckpt_dir}", flush=True)
        if preempted:
            if env.is_main and state.step < stop_at:  # a signal at the last step needs no second start
                watcher.mark_requeue(run_dir, state.step)
            break

    if env.is_main and cfg.logging.plots:
        from phsa_train.plots import plot_run

        plot_run(run_dir)
    if env.is_main:
        logger.summary_charts()
    logger.finish()
    result = {"step": state.step, "loss": loss, "valid_loss": valid_loss,
              "run_dir": str(run_dir), "preempted": watcher.stopped}
    shutdown()
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from phsa_train.config import ConfigError
    from phsa_train.convert import ConversionError

    try:
        train(cfg)
    except (ConfigError, ConversionError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", flush=True)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
