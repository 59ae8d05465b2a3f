"""LoRA through PEFT: adapters injected into our own modules, checkpoints that hold only the adapters, and
the final model written merged, with a PEFT adapter directory beside it.

PEFT's layers wrap our nn.Linear modules in place (inject_adapter_in_model), so the training loop, DDP and
the chunked loss run unchanged; the base weights are frozen and only the adapters (A random, B zero: the
model starts as the base) train. The adapter directory states its target modules under Hugging Face's
names, so `peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(init_from), out_dir/adapter)`
loads it (tested).
"""
import contextlib
import os

from errors import Fatal
from model import _LAYER_NAMES, to_hf_name

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ADAPTER_DIR = "adapter"  # in out_dir: the final adapter, for peft.PeftModel.from_pretrained
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_hf_names():
    """{wq: q_proj, ..., w3: up_proj}: the modules LoRA can target, by our names and Hugging Face's."""
    return {ours.split(".")[-1]: to_hf_name(f"layers.0.{ours}.weight").split(".")[-2]
            for ours in _LAYER_NAMES if ours.split(".")[-1] in LORA_TARGETS}


def lora_target_names(targets):
    """Our module names (wq, ..., w3) for --lora_targets, which may use Hugging Face's (q_proj, ...)."""
    ours_of = {**{name: name for name in LORA_TARGETS}, **{hf: ours for ours, hf in lora_hf_names().items()}}
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in ours_of]
    if unknown or not names:
        raise Fatal(f"--lora_targets {targets!r}: unknown module(s) {unknown}; choose from {', '.join(ours_of)}")
    return sorted({ours_of[t] for t in names}, key=LORA_TARGETS.index)


def lora_config(args, hf_names=False):
    """PEFT's LoraConfig of the run: for our modules, or (hf_names) as adapter_config.json states it for
    the LlamaForCausalLM of --init_from."""
    from peft import LoraConfig
    targets = lora_target_names(args.lora_targets)
    if not hf_names:
        return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=targets)
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=[lora_hf_names()[t] for t in targets], task_type="CAUSAL_LM",
                      base_model_name_or_path=os.path.abspath(args.init_from))


def add_lora(model, args):
    """PEFT's LoRA layers around the target modules, in place: the base weights are frozen, only the
    adapters (A random, B zero: the model starts as the base) train."""
    from peft import inject_adapter_in_model
    return inject_adapter_in_model(lora_config(args), model)


def is_lora_weight(name):
    return ".lora_A." in name or ".lora_B." in name


def adapter_hf_name(name):
    """layers.0.attention.wq.lora_A.default.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight,
    the name PEFT's adapter files use for a LlamaForCausalLM."""
    module, lora = name.split(".lora_")
    matrix, _adapter, param = lora.split(".")
    return f"base_model.model.{to_hf_name(module + '.weight')[:-len('.weight')]}.lora_{matrix}.{param}"


def write_adapter_dir(path, state_dict, args):
    """A PEFT adapter directory: adapter_config.json and the adapter weights under Hugging Face's names."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    lora_config(args, hf_names=True).save_pretrained(path)
    weights = {adapter_hf_name(k): v.detach().float().contiguous().cpu()
               for k, v in state_dict.items() if is_lora_weight(k)}
    save_file(weights, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model, path):
    """The adapter weights a checkpoint holds, into a model with LoRA layers of the same configuration."""
    from safetensors.torch import load_file
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise Fatal(f"{path} holds no LoRA adapter ({ADAPTER_WEIGHTS}): it is not a checkpoint of a LoRA run")
    saved = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    ours = {adapter_hf_name(name): name for name in model.state_dict() if is_lora_weight(name)}
    mismatch = Fatal(f"{path} holds adapters for other modules or of another rank than --lora_targets and "
                     "--lora_rank ask for; resume with the run's own LoRA arguments")
    if saved.keys() != ours.keys():
        raise mismatch
    try:
        model.load_state_dict({ours[k]: v for k, v in saved.items()}, strict=False)
    except RuntimeError:
        raise mismatch


def merged_state_dict(model):
    """The model's state dict with each adapter added into its base weight: an ordinary model."""
    from peft.tuners.lora import LoraLayer
    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            merged[f"{name}.weight"] = module.base_layer.weight.detach() + module.get_delta_weight("default")
    for name, tensor in model.state_dict().items():
        if not is_lora_weight(name):
            merged.setdefault(name.replace(".base_layer.", "."), tensor)
    return merged


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model without its adapters (DPO's reference under LoRA: no second copy in memory)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
