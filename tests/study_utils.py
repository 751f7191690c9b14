"""The tiny study the study tests train (seconds on CPU), and the run they share."""

import yaml
from modalmoe.study import StudyRunner, load_study

__all__ = ["TINY_STUDY", "run_tiny_study"]

TINY_STUDY = {
    "name": "tiny",
    "base": "smoke",
    "set": {
        "model.hidden_size": 32, "model.num_heads": 2, "model.num_layers": 2, "model.ffn_hidden_size": 64,
        "model.moe.ffn_hidden_size": 32, "model.moe.num_experts": 4, "model.moe.capacity_factor": 1.25,
        "data.batch_size": 16, "data.num_workers": 0, "data.shuffle_buffer": 50,
        "train.log_every": 2, "train.eval_batches": 1, "train.retrieval_size": 8, "train.warmup_steps": 1,
        "train.progress": False, "train.tensorboard": False, "train.report": False, "train.threads": 1,
    },
    "seeds": [0, 1],
    "steps": 4,
    "track_points": 2,
    "data": {
        "source": {"kind": "demo", "n_train": 48, "n_eval": 24},
        "shifted": {"kind": "shifted", "source": "source", "n_train": 48, "n_eval": 24},
    },
    "probe": {"batches": 2, "batch_size": 8, "cka_tokens": 32},
    "reference": "aware",
    "arms": {
        "aware": {"set": {"model.moe.router": "modality"}},
        "target": {"set": {"model.moe.router": "topk", "model.moe.lb_modality_coef": 0.1}, "target_from": "aware"},
        "long": {"set": {"model.moe.router": "topk"}, "steps_mult": 2},
        "aware_shifted": {"set": {"model.moe.router": "modality"}, "data": "shifted"},
    },
    "transfer": {"to": "shifted", "arms": ["aware"], "trained_on_target": {"aware": "aware_shifted"}},
    "experiments": [
        {"title": "1. aware vs target", "kind": "compare", "arms": ["aware", "target"]},
        {"title": "4. dynamics", "kind": "dynamics", "arms": ["aware", "long"]},
        {"title": "5. cka", "kind": "cka", "arms": ["aware", "target"]},
        {"title": "6. transfer", "kind": "transfer"},
    ],
}


def run_tiny_study(root, study: dict):
    """Write ``study`` as YAML under ``root`` and run it: (yaml path, study folder, report, log lines)."""
    path = root / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    out = root / "out"
    lines: list[str] = []
    report = StudyRunner(load_study(path), out, log=lines.append).run()
    return path, out, report, lines
