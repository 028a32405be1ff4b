"""Step 1 of InstructGPT: supervised fine-tuning on demonstrations, with TRL's SFTTrainer.

Users send `demonstration` feedback: a prompt and the answer they would have liked. When
enough new ones have arrived (RoundConfig decides), the policy is fine-tuned on them for a
few steps. The result is the new reference policy of the KL term and the policy PPO
starts from, as the paper's PPO started from (and was penalised towards) its SFT model.

The data is TRL's prompt-completion format ({"prompt", "completion"}): the loss is on the
completion only, EOS is appended by the trainer, and the prompt is the raw logged prompt
text, the same text the server generated from and PPO samples from.

Under torchrun the Trainer runs DDP in the process group distributed.py started: each rank
takes batch_size / world of every global batch, and the loss is divided by the completion
tokens of ALL ranks (the Trainer's average_tokens_across_devices); rank 0 alone saves.

TRL (and `datasets`) take ~10 s to import on a busy 2-core machine, so they are imported
inside run_sft, only when a round has demonstrations to learn from.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from instructloop.learner import distributed
from instructloop.learner.config import SFTStepConfig
from instructloop.learner.dataset import Demonstration

log = logging.getLogger(__name__)


def trainer_args(cfg: SFTStepConfig, output_dir: str, on_cuda: bool, **overrides):
    """The SFTConfig run_sft trains with (overrides: for tests). Under torchrun each rank
    takes batch_size / world of every global batch, and the loss divides by the tokens of
    all ranks (average_tokens_across_devices), not each rank's own."""
    from trl import SFTConfig

    fields = dict(
        output_dir=output_dir,  # checkpoints are not kept: save_strategy "no"
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size // distributed.world_size(),
        average_tokens_across_devices=True,
        learning_rate=cfg.learning_rate,
        max_length=cfg.max_length,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=not on_cuda,
        bf16=on_cuda,
        gradient_checkpointing=False,  # tiny models: recomputation only costs time
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return SFTConfig(**{**fields, **overrides})


def run_sft(
    cfg: SFTStepConfig,
    demonstrations: Sequence[Demonstration],
    init_dir: str | Path,
    out_dir: str | Path,
    stop: threading.Event | None = None,
    device: str = "cpu",
) -> dict:
    """Fine-tune the full checkpoint at init_dir on the demonstrations; save to out_dir.

    Returns metrics (steps, final loss, seconds, demonstrations/s). If `stop` is set,
    training ends after the current step (the caller decides what the result is worth).
    device: 'cpu', or a CUDA device: then the Trainer trains on its GPU with bf16 autocast
    over the float32 weights (its `bf16` option), as the other stages do (device.py).
    """
    import torch
    from datasets import Dataset as HFDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    if not demonstrations:
        raise ValueError("SFT needs at least one demonstration")
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    data = HFDataset.from_list([{"prompt": d.prompt, "completion": d.text} for d in demonstrations])
    log.info(
        "sft: %d demonstrations, %d steps of %d, from %s",
        len(demonstrations),
        cfg.max_steps,
        cfg.batch_size,
        init_dir,
    )

    class Progress(TrainerCallback):
        """Steps, loss and throughput through our logger (the Trainer's tqdm is off)."""

        def __init__(self):
            self.t0 = time.perf_counter()
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if distributed.any_rank(stop is not None and stop.is_set()):  # every rank stops
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                dt = time.perf_counter() - self.t0
                log.info(
                    "sft step %d/%d loss %.4f  %.1f demonstrations/s",
                    state.global_step,
                    state.max_steps,
                    logs["loss"],
                    state.global_step * cfg.batch_size / dt,
                )

    progress = Progress()
    on_cuda = torch.device(device).type == "cuda"
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(
            f"--sft-batch-size {cfg.batch_size} must be a multiple of the {world} ranks"
        )
    with tempfile.TemporaryDirectory(prefix="sft-trainer-") as scratch:
        args = trainer_args(cfg, scratch, on_cuda)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[progress],
        )
        trainer.remove_callback(PrinterCallback)  # Progress logs instead of print(dict)
        result = trainer.train()
        seconds = time.perf_counter() - progress.t0
        out = Path(out_dir)
        if not distributed.is_main():  # rank 0 alone saves
            return {"steps": result.global_step, "seconds": seconds}
        trainer.save_model(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of a version
    tokenizer.padding_side = "left"  # what the server and PPO expect of a policy dir
    tokenizer.save_pretrained(out)
    metrics = {
        "steps": result.global_step,
        "train_loss": float(result.training_loss),
        "final_loss": progress.losses[-1] if progress.losses else float(result.training_loss),
        "demonstrations": len(demonstrations),
        "seconds": seconds,
        "demonstrations_per_s": result.global_step * cfg.batch_size / seconds,
        "init_dir": str(init_dir),
        "device": str(device),
    }
    (out / "instructloop_sft.json").write_text(
        json.dumps({"config": asdict(cfg), "metrics": metrics}, indent=2) + "\n"
    )
    log.info(
        "sft done: %d steps, loss %.4f, %.1fs", metrics["steps"], metrics["train_loss"], seconds
    )
    return metrics
