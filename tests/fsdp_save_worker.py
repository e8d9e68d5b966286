"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): a PEFT model sharded with real
FSDP (as transformers' Trainer wraps it: one unit per LoRA layer), on a plain or a 4-bit base (argv[3]),
is written by `train.save`."""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import AutoModelForCausalLM

from faqtune.config import load_config
from faqtune.models import attach_lora, load_base_model
from faqtune.run import RunDir
from faqtune.train import save

base, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
torch.manual_seed(0)
if sys.argv[3] == "4bit":  # QLoRA + FSDP as faqtune loads it under `accelerate launch` (quant storage = bf16)
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    cfg = load_config(None, {"quantization.compute_dtype": "bf16", "lora.r": "4"})
    model = attach_lora(load_base_model(base, cfg), cfg)
else:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
for name, p in model.named_parameters():
    if "lora_B" in name:
        torch.nn.init.normal_(p)  # B starts at zero: give it values a lost tensor would show
expected = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
sharded = FSDP(model, device_id=torch.device("cpu"), use_orig_params=False, auto_wrap_policy=fsdp_auto_wrap_policy(model))


def get_state_dict(model):
    """accelerate's Accelerator.get_state_dict for FSDP(1), less its offload_to_cpu (a GPU->CPU copy that
    breaks on CPU); accelerate itself refuses FSDP on CPU, hence this stand-in for the trainer's accelerator."""
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


run = RunDir(out)
run.root.mkdir(parents=True, exist_ok=True)
trainer = SimpleNamespace(
    is_fsdp_enabled=True, model=sharded, is_world_process_zero=lambda: dist.get_rank() == 0,
    accelerator=SimpleNamespace(get_state_dict=get_state_dict),
    state=SimpleNamespace(global_step=1, epoch=1.0, log_history=[{"loss": 1.0}]),
    args=SimpleNamespace(world_size=2, activation_checkpointing=False))
save(load_config(None, {}), run, trainer, SimpleNamespace(tokens=10, rows=[0]), SimpleNamespace(training_loss=1.0), 1.0)
if dist.get_rank() == 0:
    torch.save(expected, run.root / "expected.pt")
dist.barrier()
dist.destroy_process_group()
