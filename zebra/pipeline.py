"""`zebra run CONFIG.yaml`: the whole Zebra-Llama post-training pipeline (SPEC 1), resumable.

    init        pure-MLA and pure-Mamba2 students from the base model (SVD / attention-to-Mamba2 init)
    ild-mla     intermediate layer distillation of the pure-MLA student      (SPEC 4, 20% of the data)
    ild-mamba2  the same for the pure-Mamba2 student
    sensitivity per-layer scores s_i = KL_0 - KL_i + bar plot                (SPEC 5)
    smart       the MLA layer indices (SMART, or the config's list / KV budget) (SPEC 6)
    compose     the hybrid from the two ILD-refined models (and the init hybrid, for the KL baseline)
    distill     end-to-end KD from the teacher on the other 80%               (SPEC 7)
    pairs       preference pairs: dataset reply vs the student's own sample
    dpo         DPO with the distilled student as frozen reference            (SPEC 8)
    report      report.md: KL after each stage, chosen layers, KV %, plots, throughput

Each stage writes RUN/<stage>/ with config.json (the resolved config), metrics.jsonl, its outputs and a
DONE marker written last. A re-run skips stages that are DONE; a training stage that was interrupted
resumes from its last atomic checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from .errors import ZebraError

STAGES = ["init", "ild-mla", "ild-mamba2", "sensitivity", "smart", "compose", "distill", "pairs", "dpo", "report"]

DEFAULTS = {
    "name": "zebra-run",
    "base": "smollm2-135m-instruct",  # the model the student is built from (init + ILD teacher)
    "teacher": None,  # the end-to-end KD teacher (same tokenizer); default: the base model
    "data": ["sharegpt"],  # chat / text sources, see zebra/data/sources.py
    "seq_len": 2048,
    "seed": 0,
    "ild_fraction": 0.2,
    "device": "auto",
    "student": {"num_mla": 6, "mla_layers": None, "kv_budget": None, "kv_rank": 64, "q_rank": None,
                "rope_dim": 32, "nope_dim": None},
    "ild": {"tokens": 1_000_000, "lr": 8e-5, "batch_size": 4, "grad_accum": 1, "ckpt_every": 50,
            "grad_checkpointing": False, "warmup_frac": 0.01},
    "sensitivity": {"num_seqs": 64, "seq_len": 512, "batch_size": 8},
    "distill": {"tokens": 4_000_000, "lr": 8e-5, "batch_size": 4, "grad_accum": 1, "ckpt_every": 50,
                "grad_checkpointing": False, "warmup_frac": 0.01, "loss_on": "assistant"},
    "pairs": {"num_pairs": 256, "max_new_tokens": 128, "temperature": 1.0, "batch_size": 32},
    "dpo": {"lr": 5e-7, "beta": 0.1, "epochs": 1, "batch_size": 4, "grad_accum": 1, "max_len": 1024,
            "ckpt_every": 50, "pairs_file": None},  # pairs_file: your own (prompt, chosen, rejected) JSONL
    "eval": {"num_seqs": 64, "seq_len": 512, "batch_size": 8},
}


# ---- config -----------------------------------------------------------------------------------------
def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in base:
            raise ZebraError(f"unknown config key {where}{k!r} (known: {', '.join(sorted(base))})")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ZebraError(f"config key {where}{k!r} must be a mapping")
            out[k] = _merge(base[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def load_config(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ZebraError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ZebraError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ZebraError(f"{path} must hold a mapping of settings")
    cfg = _merge(DEFAULTS, raw)
    cfg["teacher"] = cfg["teacher"] or cfg["base"]
    for stage in ("ild", "distill"):
        if cfg[stage]["tokens"] <= 0:
            raise ZebraError(f"{stage}.tokens must be positive")
    if cfg["seq_len"] < 16:
        raise ZebraError("seq_len must be at least 16")
    return cfg


# ---- the run ----------------------------------------------------------------------------------------
class Run:
    def __init__(self, cfg: dict, out_dir: str | Path):
        self.cfg, self.out = cfg, Path(out_dir)
        dev = cfg["device"]
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)
        self._teachers: dict[str, object] = {}
        self._heldout = None
        self.tok = None

    # helpers ------------------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def done(self, name: str) -> bool:
        return (self.stage_dir(name) / "DONE").exists()

    def mark_done(self, name: str, summary: dict) -> None:
        from .stages.trainer import atomic_write_text

        d = self.stage_dir(name)
        atomic_write_text(d / "summary.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(d / "DONE", time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def teacher(self, which: str):
        """The base or KD teacher as an all-attention Zebra model (exactly the teacher), cached."""
        name = self.cfg[which]
        if name not in self._teachers:
            from .convert.build import build_student

            model, tok, _ = build_student(name, "none", "all")
            for p in model.parameters():
                p.requires_grad_(False)
            self._teachers[name] = model.to(self.device).eval()
            if self.tok is None:
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                self.tok = tok
        return self._teachers[name]

    def tokenizer(self):
        if self.tok is None:
            from transformers import AutoTokenizer

            from .assets import resolve_teacher

            self.tok = AutoTokenizer.from_pretrained(resolve_teacher(self.cfg["base"]))
            if self.tok.pad_token is None:
                self.tok.pad_token = self.tok.eos_token
        return self.tok

    def load(self, path: Path):
        from transformers import AutoModelForCausalLM

        import zebra  # noqa: F401

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device)

    def heldout(self):
        if self._heldout is None:
            from .data.chat import heldout_sequences

            e = self.cfg["eval"]
            self._heldout = heldout_sequences(self.tokenizer(), e["num_seqs"], e["seq_len"])
        return self._heldout

    def kl(self, model) -> dict:
        from .eval.agreement import agreement

        teacher = self.teacher("teacher")
        return agreement(teacher, model, self.heldout(), batch_size=self.cfg["eval"]["batch_size"])

    def stream(self, split: str, stage: dict):
        from .data.packing import build_dataset

        return build_dataset(self.tokenizer(), self.cfg["data"], seq_len=self.cfg["seq_len"], split=split,
                             seed=self.cfg["seed"], max_tokens=stage["tokens"], batch_size=stage["batch_size"],
                             ild_fraction=self.cfg["ild_fraction"], loss_on=stage.get("loss_on", "all"),
                             cache_dir=self.out / "data-cache")

    def train_config(self, stage: dict, tokens: int):
        from .stages.trainer import TrainConfig

        return TrainConfig(tokens=tokens, lr=stage["lr"], batch_size=stage["batch_size"],
                           grad_accum=stage["grad_accum"], ckpt_every=stage["ckpt_every"], seed=self.cfg["seed"],
                           warmup_frac=stage.get("warmup_frac", 0.01),
                           grad_checkpointing=stage.get("grad_checkpointing", False))

    def write_stage_config(self, name: str, extra: dict | None = None) -> Path:
        d = self.stage_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"stage": name, "run": self.cfg, **(extra or {})}, indent=2) + "\n")
        return d

    # stages -------------------------------------------------------------------------------------------
    def run_init(self):
        from .convert.build import build_student, save_model

        s = self.cfg["student"]
        d = self.write_stage_config("init")
        out = {}
        for kind, mla in (("mla", "all"), ("mamba2", "none")):
            model, tok, report = build_student(self.cfg["base"], mla, "none", kv_rank=s["kv_rank"], q_rank=s["q_rank"],
                                               rope_dim=s["rope_dim"], nope_dim=s["nope_dim"], seed=self.cfg["seed"])
            save_model(model, tok, d / kind, report)
            out[kind] = report["kv"]
        return {"kv": out}

    def run_ild(self, kind: str):
        from .convert.build import save_model
        from .stages.ild import ild_parameters, make_ild_loss
        from .stages.trainer import Trainer

        name = f"ild-{kind}"
        st = self.cfg["ild"]
        d = self.write_stage_config(name)
        student = self.load(self.stage_dir("init") / kind)
        teacher = self.teacher("base")
        params = ild_parameters(student)
        stream = self.stream("ild", st)
        trainer = Trainer(student, params, make_ild_loss(teacher, student, st["grad_checkpointing"]), stream,
                          self.train_config(st, st["tokens"]), d, name, self.device)
        summary = trainer.fit()
        save_model(student, self.tokenizer(), d / "model", {"stage": name})
        trainer.ckpt_path.unlink(missing_ok=True)
        return summary

    def run_sensitivity(self):
        from .data.chat import heldout_sequences
        from .stages.sensitivity import layer_sensitivity

        st = self.cfg["sensitivity"]
        d = self.write_stage_config("sensitivity")
        mamba = self.load(self.stage_dir("ild-mamba2") / "model").eval()
        mla = self.load(self.stage_dir("ild-mla") / "model").eval()
        seqs = heldout_sequences(self.tokenizer(), st["num_seqs"], st["seq_len"])
        res = layer_sensitivity(self.teacher("base"), mamba, mla, seqs, st["batch_size"])
        (d / "sensitivity.json").write_text(json.dumps(res, indent=2) + "\n")
        self._plot_sensitivity(res["scores"], None, d / "sensitivity.png")
        return {"kl_all_mamba2": res["kl_all_mamba2"], "best_layer": max(range(len(res["scores"])), key=res["scores"].__getitem__)}

    def _plot_sensitivity(self, scores, chosen, path):
        try:
            from .eval.plots import plot_sensitivity
        except ImportError:
            return
        plot_sensitivity(scores, chosen, path)

    def run_smart(self):
        from .convert.teacher import load_teacher_config
        from .stages.smart import kv_budget_num_mla, load_scores, smart_select

        s = self.cfg["student"]
        d = self.write_stage_config("smart")
        scores = load_scores(self.stage_dir("sensitivity") / "sensitivity.json")
        if s["mla_layers"] is not None:
            layers, how = sorted(int(i) for i in s["mla_layers"]), "config"
        else:
            n = s["num_mla"]
            if s["kv_budget"] is not None:
                n = kv_budget_num_mla(load_teacher_config(self.cfg["base"]), s["kv_budget"], s["kv_rank"], s["rope_dim"])
            layers, how = smart_select(scores, n), "smart"
        (d / "smart.json").write_text(json.dumps({"layers": layers, "how": how}, indent=2) + "\n")
        self._plot_sensitivity(scores, layers, self.stage_dir("sensitivity") / "sensitivity.png")
        return {"layers": layers, "how": how}

    def run_compose(self):
        from .convert.build import save_model
        from .stages.compose import compose

        d = self.write_stage_config("compose")
        layers = json.loads((self.stage_dir("smart") / "smart.json").read_text())["layers"]
        result = {"layers": layers}
        for tag, src in (("init", ("init/mla", "init/mamba2")), ("ild", ("ild-mla/model", "ild-mamba2/model"))):
            mla, mamba = self.load(self.out / src[0]), self.load(self.out / src[1])
            hybrid = compose(mla, mamba, layers)
            result[f"kl_{tag}"] = self.kl(hybrid)
            if tag == "ild":
                save_model(hybrid, self.tokenizer(), d / "model", {"stage": "compose", "layers": layers})
                result["kv"] = hybrid.config.kv_summary()
            del mla, mamba, hybrid
        return result

    def run_distill(self):
        from .convert.build import save_model
        from .stages.distill import make_distill_loss
        from .stages.trainer import Trainer

        st = self.cfg["distill"]
        d = self.write_stage_config("distill")
        student = self.load(self.stage_dir("compose") / "model")
        for p in student.parameters():
            p.requires_grad_(True)
        teacher = self.teacher("teacher")
        if st["grad_checkpointing"]:
            student.model.gradient_checkpointing = True
        trainer = Trainer(student, student.parameters(), make_distill_loss(teacher, student), self.stream("kd", st),
                          self.train_config(st, st["tokens"]), d, "distill", self.device)
        summary = trainer.fit()
        student.model.gradient_checkpointing = False
        summary["kl"] = self.kl(student)
        save_model(student, self.tokenizer(), d / "model", {"stage": "distill"})
        trainer.ckpt_path.unlink(missing_ok=True)
        return summary

    def run_pairs(self):
        from .data.packing import ild_kd_part
        from .data.sources import load_conversations, source_key
        from .stages.pairs import make_pairs

        st = self.cfg["pairs"]
        d = self.write_stage_config("pairs")
        if self.cfg["dpo"]["pairs_file"]:  # the user brought preference data: nothing to make
            from .stages.pairs import read_pairs

            return {"pairs": len(read_pairs(self.cfg["dpo"]["pairs_file"])), "source": self.cfg["dpo"]["pairs_file"]}
        student = self.load(self.stage_dir("distill") / "model").eval()
        kd = []  # prompts from the KD share (the same split the distillation stream uses), never held-out
        for src in self.cfg["data"]:
            salt = source_key(src)
            kd += [c for i, c in enumerate(load_conversations(src)) if ild_kd_part(i, self.cfg["ild_fraction"], 0, salt) == "kd"]
        kd = list(reversed(kd))  # the end of the data: the prompts a distillation budget is least likely to reach
        n = make_pairs(student, self.tokenizer(), kd, st["num_pairs"], d / "pairs.jsonl", st["max_new_tokens"],
                       st["temperature"], st["batch_size"], seed=self.cfg["seed"])
        return {"pairs": n}

    def run_dpo(self):
        from .convert.build import save_model
        from .stages.dpo import PairStream, make_dpo_loss
        from .stages.pairs import read_pairs
        from .stages.trainer import Trainer

        st = self.cfg["dpo"]
        d = self.write_stage_config("dpo")
        policy = self.load(self.stage_dir("distill") / "model")
        reference = self.load(self.stage_dir("distill") / "model").eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        pairs_path = st["pairs_file"] or self.stage_dir("pairs") / "pairs.jsonl"
        stream = PairStream(self.tokenizer(), read_pairs(pairs_path), st["batch_size"],
                            st["max_len"], st["epochs"], self.cfg["seed"])
        tokens = stream.num_batches * stream.tokens_per_batch
        cfg = self.train_config({**st, "warmup_frac": 0.1}, tokens)
        trainer = Trainer(policy, policy.parameters(), make_dpo_loss(policy, reference, st["beta"]), stream, cfg, d,
                          "dpo", self.device)
        summary = trainer.fit()
        summary["kl"] = self.kl(policy)
        save_model(policy, self.tokenizer(), d / "model", {"stage": "dpo"})
        trainer.ckpt_path.unlink(missing_ok=True)
        return summary

    def run_report(self):
        from .stages.report import write_report

        d = self.write_stage_config("report")
        path = write_report(self.out, self.cfg)
        return {"report": str(path)}

    def run(self, only: list[str] | None = None) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "run_config.json").write_text(json.dumps(self.cfg, indent=2) + "\n")
        fns = {"init": self.run_init, "ild-mla": lambda: self.run_ild("mla"), "ild-mamba2": lambda: self.run_ild("mamba2"),
               "sensitivity": self.run_sensitivity, "smart": self.run_smart, "compose": self.run_compose,
               "distill": self.run_distill, "pairs": self.run_pairs, "dpo": self.run_dpo, "report": self.run_report}
        for name in STAGES:
            if only and name not in only:
                continue
            if self.done(name) and name != "report":
                print(f"[zebra run] {name}: done, skipping", flush=True)
                continue
            print(f"[zebra run] {name} ...", flush=True)
            t0 = time.perf_counter()
            summary = fns[name]()
            summary["seconds"] = round(time.perf_counter() - t0, 1)
            self.mark_done(name, summary)
            print(f"[zebra run] {name}: done in {summary['seconds']}s", flush=True)
        return self.out / "report.md"
