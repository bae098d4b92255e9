"""`zebra run CONFIG.yaml`: the whole Zebra-Llama post-training pipeline (SPEC 1), resumable.

    init        pure-MLA and pure-Mamba2 students from the base model (SVD / attention-to-Mamba2 init)
    ild         intermediate layer distillation of both pools from one teacher pass   (SPEC 4, 20% of the data)
    sensitivity per-layer scores s_i = KL_0 - KL_i + bar plot                             (SPEC 5)
    smart       the MLA layer indices (SMART, or the config's list / KV budget)           (SPEC 6)
    compose     the hybrid from the two ILD pools (and the init hybrid, for the KL baseline)
    distill     end-to-end KD from the teacher on the other 80%, with a held-out KL curve (SPEC 7)
    pairs       preference pairs: dataset reply vs the student's own sample      (skipped: dpo.enabled false)
    dpo         DPO with the distilled student as frozen reference                (SPEC 8; optional)
    eval        the final student vs the teacher: held-out chat KL / top-1, plain-text perplexity, lm-eval tasks
    report      report.md: KL after each stage, layers, KV %, accuracy table, curves, throughput

Each stage writes RUN/<stage>/ with config.json (the resolved config), metrics.jsonl, its outputs and a
DONE marker written last. A re-run skips stages that are DONE; a training stage that was interrupted
resumes from its last atomic checkpoint. RUN/summary.json (written by eval) holds the headline numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .errors import ZebraError
from .runconfig import DEFAULTS, load_config  # noqa: F401  (re-exported: zebra.pipeline.load_config)
from .stages.parallel import barrier, broadcast_object

_PROXY: dict = {}  # (teacher, tasks, limit) -> (QuickMC, the teacher's scores)
STAGES = ["init", "ild", "sensitivity", "smart", "compose", "distill", "pairs", "dpo", "eval", "report"]
TRAINED = ("ild", "distill", "dpo")


def _layer_list(spec, L: int, key: str) -> list[int] | None:
    """A config layer list: None, "all", "none", "every-K" (0, K, 2K, ...) or a list of indices."""
    if spec is None:
        return None
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(L))
        if s == "none":
            return []
        if s.startswith("every-") and s[6:].isdigit() and int(s[6:]) > 0:
            return list(range(0, L, int(s[6:])))
        raise ZebraError(f"config key {key!r}: {spec!r} is not a layer list (a list, 'all', 'none' or 'every-K')")
    out = sorted({int(i) for i in spec})
    bad = [i for i in out if not 0 <= i < L]
    if bad:
        raise ZebraError(f"config key {key!r}: layers {bad} are outside [0, {L - 1}]")
    return out


class Run:
    def __init__(self, cfg: dict, out_dir: str | Path):
        from .stages.fastpath import want_compile

        from .stages.parallel import rank_world

        self.cfg, self.out = cfg, Path(out_dir)
        self.rank, self.world = rank_world()
        dev = cfg["device"]
        if self.world > 1 and dev == "auto":  # torchrun: this rank's GPU (zebra.stages.parallel.init_distributed)
            self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)
        self.compile = want_compile(cfg["compile"], self.device)
        self.save_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg["save_dtype"]]
        self._teachers: dict = {}
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

    def teacher(self, which: str, dtype: torch.dtype | None = None, copy: str = ""):
        """The base or KD teacher as an all-attention Zebra model (exactly the teacher), frozen, cached per dtype.
        Training uses bf16 on CUDA (no per-step weight casts under autocast); evaluation fp32. copy: a named copy of
        its own (train_teacher's sharded ones: a collective to run, so never the one that rank 0 evaluates with
        alone)."""
        name = self.cfg[which]
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        key = (name, dtype, copy)
        if key not in self._teachers:
            from .convert.build import build_student

            model, tok, _ = build_student(name, "none", "all")
            for p in model.parameters():
                p.requires_grad_(False)
            self._teachers[key] = model.to(device=self.device, dtype=dtype).eval()
            if self.tok is None:
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                self.tok = tok
        return self._teachers[key]

    def train_teacher(self, which: str, compile: bool = False):
        """The frozen teacher a training stage runs on every rank: `teacher(which)` (its layers compiled when
        `compile`), or with several FSDP ranks and `teacher_sharding` saying so (decided from its parameter count
        before it is built) a fresh copy, compiled first if asked (FSDP2's order: compile the blocks, then shard
        them), then its decoder layers sharded across the ranks. A stage's sharded copy replaces the previous
        stage's (not kept for the rest of the run)."""
        from .plan import param_count
        from .stages.fastpath import compile_layers
        from .stages.parallel import shard_frozen

        sharded = self.world > 1 and self._shards_frozen(
            param_count(self.cfg[which]) * (2 if self.device.type == "cuda" else 4))
        if not sharded:
            t = self.teacher(which)
            if compile:
                compile_layers(t)
            return t
        for key in [k for k in self._teachers if k[2] == "sharded"]:
            del self._teachers[key]
        t = self.teacher(which, copy="sharded")
        if compile:
            compile_layers(t)
        return shard_frozen(t)

    def _shards_frozen(self, nbytes: float) -> bool:
        """Whether a frozen model of `nbytes` (a teacher, DPO's reference) is sharded in this run (parallel's rule)."""
        from .stages.parallel import teacher_sharded

        return teacher_sharded(self.cfg["teacher_sharding"], self.cfg["parallel"], nbytes, self.device)

    def eval_teacher(self):
        """The teacher that held-out metrics compare with: fp32 up to 1B parameters (cheap), else the bf16 one."""
        t = self.teacher("teacher")
        if sum(p.numel() for p in t.parameters()) <= 1e9:
            return self.teacher("teacher", torch.float32)
        return t

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

    def kl(self, model, seqs=None) -> dict:
        from .eval.agreement import agreement

        return agreement(self.eval_teacher(), model, seqs if seqs is not None else self.heldout(),
                         batch_size=self.cfg["eval"]["batch_size"])

    def stream(self, split: str, stage: dict, loss_on: str = "all", all_ranks: bool = True):
        """A PackedStream of this rank's batches, from the stage's own `data` when it has one, else the run's.
        all_ranks: every rank builds it now (a training stage), so rank 0 tokenises first and the others then read
        the cache; False: only this rank does (no barrier)."""
        import contextlib

        from .assets import cache_dir
        from .data.packing import build_dataset
        from .stages.parallel import main_first

        # tokenised sources are cached by (tokenizer, source, loss_on) under the zebra cache: every run shares them
        with main_first() if all_ranks else contextlib.nullcontext():
            return build_dataset(self.tokenizer(), stage.get("data") or self.cfg["data"],
                                 seq_len=stage.get("seq_len") or self.cfg["seq_len"], split=split,
                                 seed=self.cfg["seed"], max_tokens=stage["tokens"], batch_size=stage["batch_size"],
                                 ild_fraction=self.cfg["ild_fraction"], loss_on=loss_on,
                                 cache_dir=cache_dir() / "tokenized")

    def train_config(self, stage: dict, tokens: int, **extra):
        from .stages.trainer import TrainConfig

        keys = ("lr", "batch_size", "grad_accum", "ckpt_every", "grad_checkpointing", "warmup_frac",
                "warmup_steps", "schedule", "decay_frac", "token_weighting", "eval_every", "time_budget_s")
        kw = {k: stage[k] for k in keys if k in stage}
        if "betas" in stage:
            kw["betas"] = tuple(stage["betas"])
        kw.update(extra)
        return TrainConfig(tokens=tokens, seed=self.cfg["seed"], **kw)

    def write_stage_config(self, name: str, extra: dict | None = None) -> Path:
        d = self.stage_dir(name)
        if self.rank == 0:
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text(json.dumps({"stage": name, "run": self.cfg, **(extra or {})}, indent=2)
                                           + "\n")
        return d

    def final_model_dir(self) -> Path:
        return self.stage_dir("dpo" if self.cfg["dpo"]["enabled"] else "distill") / "model"

    def num_layers(self) -> int:
        from .convert.teacher import load_teacher_config

        return int(load_teacher_config(self.cfg["base"])["num_hidden_layers"])

    # stages -------------------------------------------------------------------------------------------
    def run_init(self):
        from .convert.build import build_student, save_model
        from .stages.ild import make_ild_loss

        s = self.cfg["student"]
        d = self.write_stage_config("init")
        out, models, seconds = {}, {}, {}
        first_batch = None
        clock = time.perf_counter()

        def lap(name):  # where the stage's time goes, in its summary
            nonlocal clock
            now = time.perf_counter()
            seconds[name] = round(seconds.get(name, 0.0) + now - clock, 2)
            clock = now

        for kind, mla in (("mla", "all"), ("mamba2", "none")):
            model, tok, report = build_student(self.cfg["base"], mla, "none", kv_rank=s["kv_rank"], q_rank=s["q_rank"],
                                               rope_dim=s["rope_dim"], nope_dim=s["nope_dim"], seed=self.cfg["seed"],
                                               rope_select=s["rope_select"], conv_init=s["conv_init"],
                                               gate_init=s["gate_init"])
            models[kind] = model.to(self.device).eval()
            lap("build")
            if kind == "mamba2" and s["calibrate_tokens"]:
                from .convert.calibrate import calibrate_mamba2_norms

                stream = self.stream("ild", {"tokens": s["calibrate_tokens"], "batch_size": 8, "seq_len": 512},
                                     all_ranks=False)
                batches = [{k: v.to(self.device) for k, v in b.items()} for b in stream]
                teacher = self.eval_teacher()
                lap("data_and_teacher")
                from .ops.dispatch import using_backend

                # the PyTorch scan and conv (as training's): the GPU kernels' fp32 variable-length forms would be
                # compiled for these few batches alone
                with using_backend("torch"):
                    report["calibration"] = calibrate_mamba2_norms(teacher, model, batches)
                first_batch = report["calibration"]["first_batch_seconds"]  # of "calibrate": compilation shows
                lap("calibrate")
            save_model(model, tok, d / kind, report)
            lap("save")
            out[kind] = report["kv"]
        # the per-layer attention-output error of the initialised mixers on held-out chat (SPEC 3.1's comparison)
        from .eval.agreement import pad_batch

        ids, mask = pad_batch(self.heldout()[:8])
        teacher = self.eval_teacher()
        lap("data_and_teacher")
        with torch.no_grad():
            _, _, metrics = make_ild_loss(teacher, models, "mixers")(
                {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)})
        lap("mixer_error")
        return {"kv": out, "mixer_rel_err": metrics, "seconds_by_part": seconds,
                "calibrate_first_batch_seconds": first_batch}

    def _train(self, name: str, models: dict, fn, groups, stream, tcfg, evaluator=None, frozen=None):
        """Train `models` (dict of the stage's trained models) with loss `fn` on every rank: the loss runs as a
        StageLoss module, wrapped by FSDP2 / DDP when there are several ranks (config `parallel`). `frozen`: the
        stage's teacher / reference (the summary says whether it was sharded). Returns (trainer summary, full state
        dict of each model on rank 0, {} elsewhere)."""
        from .stages.parallel import StageLoss, full_state_dict, is_sharded, regroup, wrap
        from .stages.trainer import Trainer, param_groups

        loss = StageLoss(models, fn)
        before = {id(p): n for n, p in loss.named_parameters()}
        wrapped = wrap(loss, self.cfg["parallel"], mixed_precision=self.device.type == "cuda", device=self.device)
        if wrapped is not loss:
            wrapped.count = loss.count
        groups = regroup(param_groups(groups), before, wrapped)
        if evaluator is not None:  # held-out metrics go through the wrapper's forward too (FSDP2 unshards there)
            inner = evaluator
            evaluator = lambda: wrapped(None, call=inner)  # noqa: E731
        trainer = Trainer(wrapped, groups, None, stream, tcfg, self.stage_dir(name), name, self.device,
                          evaluator=evaluator)
        summary = trainer.fit()
        if frozen is not None:
            summary["teacher_sharded"] = is_sharded(frozen)
        states = {k: full_state_dict(m) for k, m in models.items()} if self.world > 1 else {}
        trainer.remove_checkpoint()
        return summary, states

    def _save_trained(self, model, state: dict, source: Path, out: Path, report: dict, final: bool = True):
        """Rank 0: save a trained model; with several ranks from its gathered full state (a fresh unsharded copy of
        the stage's input model takes the weights). The run's products (distill, dpo) are written in `save_dtype`
        (bf16 by default), the ILD pools in fp32 (the next stages train from them). Returns the unsharded model
        on rank 0, None elsewhere."""
        from .convert.build import save_model

        if self.rank != 0:
            return None
        if self.world > 1:
            model = self.load(source)
            model.load_state_dict(state)
        save_model(model, self.tokenizer(), out, report, dtype=self.save_dtype if final else None)
        return model

    def run_ild(self):
        from .stages.fastpath import compile_layers
        from .stages.ild import ild_parameters, make_ild_loss

        st = self.cfg["ild"]
        d = self.write_stage_config("ild")
        students = {k: self.load(self.stage_dir("init") / k) for k in ("mla", "mamba2")}
        teacher = self.train_teacher("base")
        groups = ild_parameters(students, st["mode"])
        if self.compile:
            for m in students.values():
                compile_layers(m, mixers_only=st["mode"] == "mixers")
        summary, states = self._train("ild", students, make_ild_loss(teacher, students, st["mode"],
                                                                      st["grad_checkpointing"]),
                                      groups, self.stream("ild", st), self.train_config(st, st["tokens"]),
                                      frozen=teacher)
        for k, m in students.items():
            self._save_trained(m, states.get(k), self.stage_dir("init") / k, d / k, {"stage": "ild", "pool": k},
                               final=False)
        return summary

    def run_sensitivity(self):
        from .data.chat import heldout_sequences
        from .stages.sensitivity import layer_sensitivity

        st = self.cfg["sensitivity"]
        d = self.write_stage_config("sensitivity")
        mamba = self.load(self.stage_dir("ild") / "mamba2").eval()
        mla = self.load(self.stage_dir("ild") / "mla").eval()
        seqs = heldout_sequences(self.tokenizer(), st["num_seqs"], st["seq_len"])
        res = layer_sensitivity(self.eval_teacher(), mamba, mla, seqs, st["batch_size"])
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
        from .stages.smart import kv_budget_num_mla, load_scores, smart_select, top_select, uniform_select

        s = self.cfg["student"]
        L = self.num_layers()
        d = self.write_stage_config("smart")
        scores = load_scores(self.stage_dir("sensitivity") / "sensitivity.json")
        attention = _layer_list(s["attention_layers"], L, "student.attention_layers") or []
        fixed = _layer_list(s["mla_layers"], L, "student.mla_layers")
        if fixed is not None:
            layers, how = fixed, "config"
        else:
            n = s["num_mla"]
            if s["kv_budget"] is not None:
                n = kv_budget_num_mla(load_teacher_config(self.cfg["base"]), s["kv_budget"], s["kv_rank"], s["rope_dim"])
            how = s["placement"]
            layers = {"smart": lambda: smart_select(scores, n), "top": lambda: top_select(scores, n),
                      "uniform": lambda: uniform_select(L, n)}[how]()
        both = sorted(set(layers) & set(attention))
        if both:
            raise ZebraError(f"layers {both} are both in student.mla_layers (or SMART's choice) and "
                             "student.attention_layers")
        (d / "smart.json").write_text(json.dumps({"layers": layers, "attention_layers": attention, "how": how},
                                                 indent=2) + "\n")
        self._plot_sensitivity(scores, layers, self.stage_dir("sensitivity") / "sensitivity.png")
        return {"layers": layers, "attention_layers": attention, "how": how}

    def run_compose(self):
        from .convert.build import save_model
        from .stages.compose import compose

        d = self.write_stage_config("compose")
        smart = json.loads((self.stage_dir("smart") / "smart.json").read_text())
        layers, attention = smart["layers"], smart.get("attention_layers", [])
        result = {"layers": layers, "attention_layers": attention}
        attn_model = self.eval_teacher() if attention else None
        for tag, src in (("init", ("init/mla", "init/mamba2")), ("ild", ("ild/mla", "ild/mamba2"))):
            mla, mamba = self.load(self.out / src[0]), self.load(self.out / src[1])
            hybrid = compose(mla, mamba, layers, attn_model, attention)
            result[f"kl_{tag}"] = self.kl(hybrid)
            if tag == "ild":
                save_model(hybrid, self.tokenizer(), d / "model", {"stage": "compose", "layers": layers,
                                                                   "attention_layers": attention})
                result["kv"] = hybrid.config.kv_summary()
            del mla, mamba, hybrid
        return result

    def _curve_evaluator(self, student, teacher_train):
        """Held-out KL / top-1 on a small fixed held-out set, plus the multiple-choice accuracy proxy when
        distill.curve_tasks is set: the tokens-vs-quality curve, logged by the Trainer every eval_every steps."""
        from .data.chat import heldout_sequences
        from .eval.agreement import agreement
        from .stages.fastpath import eager

        st, e = self.cfg["distill"], self.cfg["eval"]
        seqs = heldout_sequences(self.tokenizer(), st["curve_seqs"], e["seq_len"])
        quick = None
        if st["curve_tasks"]:
            from .eval.quick import QuickMC

            quick = QuickMC.build(self.tokenizer(), tasks=tuple(st["curve_tasks"]), limit=st["curve_limit"])
        from .stages.parallel import is_sharded

        # a sharded training teacher serves the curve too (every rank runs the evaluator): a replicated evaluation
        # copy on every rank would take the memory that sharding saved
        teacher = teacher_train if is_sharded(teacher_train) else self.eval_teacher()

        def evaluate():
            with eager(student, teacher_train):
                a = agreement(teacher, student, seqs, batch_size=e["batch_size"])
                out = {"heldout_kl": a["kl"], "top1": a["top1_agreement"]}
                if quick is not None:
                    out["proxy"] = quick.score(student)
            return out
        return evaluate

    def run_distill(self):
        from .stages.distill import distill_parameters, make_distill_loss
        from .stages.fastpath import compile_layers, eager

        st = self.cfg["distill"]
        d = self.write_stage_config("distill")
        student = self.load(self.stage_dir("compose") / "model")
        teacher = self.train_teacher("teacher", compile=self.compile)
        if st["grad_checkpointing"]:
            student.model.gradient_checkpointing = True
        groups = distill_parameters(student, st["lr"], st["lr_other"])
        evaluator = self._curve_evaluator(student, teacher) if st["eval_every"] else None
        if self.compile:
            compile_layers(student)
        summary, states = self._train("distill", {"student": student}, make_distill_loss(teacher, student), groups,
                                      self.stream("kd", st, loss_on=st["loss_on"]),
                                      self.train_config(st, st["tokens"]), evaluator, frozen=teacher)
        student.model.gradient_checkpointing = False
        final = self._save_trained(student, states.get("student"), self.stage_dir("compose") / "model", d / "model",
                                   {"stage": "distill"})
        if final is not None:
            with eager(final):
                summary["kl"] = self.kl(final)
        return summary

    def run_pairs(self):
        from .data.packing import ild_kd_part
        from .data.sources import load_conversations, source_key
        from .stages.pairs import make_pairs

        st = self.cfg["pairs"]
        d = self.write_stage_config("pairs")
        if not self.cfg["dpo"]["enabled"]:
            return {"skipped": "dpo.enabled is false"}
        if self.cfg["dpo"]["pairs_file"]:  # the user brought preference data: nothing to make
            from .stages.pairs import read_pairs

            return {"pairs": len(read_pairs(self.cfg["dpo"]["pairs_file"])), "source": self.cfg["dpo"]["pairs_file"]}
        student = self.load(self.stage_dir("distill") / "model").eval()
        kd = []  # prompts from the KD share (the same split the distillation stream uses), never held-out
        for src in self.cfg["data"]:
            salt = source_key(src)
            chat = {**src, "render": "chat"} if isinstance(src, dict) and src.get("type", "sharegpt") != "text" else src
            kd += [c for i, c in enumerate(load_conversations(chat)) if ild_kd_part(i, self.cfg["ild_fraction"], 0, salt) == "kd"]
        kd = list(reversed(kd))  # the end of the data: the prompts a distillation budget is least likely to reach
        n = make_pairs(student, self.tokenizer(), kd, st["num_pairs"], d / "pairs.jsonl", st["max_new_tokens"],
                       st["temperature"], st["batch_size"], seed=self.cfg["seed"])
        return {"pairs": n}

    def run_dpo(self):
        from .stages.dpo import PairStream, make_dpo_loss
        from .stages.pairs import read_pairs

        st = self.cfg["dpo"]
        d = self.write_stage_config("dpo")
        if not st["enabled"]:
            return {"skipped": "dpo.enabled is false"}
        policy = self.load(self.stage_dir("distill") / "model")
        reference = self.load(self.stage_dir("distill") / "model").eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        if self._shards_frozen(sum(p.numel() * p.element_size() for p in reference.parameters())):
            from .stages.parallel import shard_frozen

            shard_frozen(reference)  # the frozen reference, like a teacher
        pairs_path = st["pairs_file"] or self.stage_dir("pairs") / "pairs.jsonl"
        stream = PairStream(self.tokenizer(), read_pairs(pairs_path), st["batch_size"],
                            st["max_len"], st["epochs"], self.cfg["seed"])
        tokens = stream.num_batches * stream.tokens_per_batch * self.world
        cfg = self.train_config({**st, "warmup_frac": 0.1}, tokens, betas=(0.9, 0.95))
        summary, states = self._train("dpo", {"policy": policy}, make_dpo_loss(policy, reference, st["beta"]),
                                      [p for p in policy.parameters()], stream, cfg, frozen=reference)
        final = self._save_trained(policy, states.get("policy"), self.stage_dir("distill") / "model", d / "model",
                                   {"stage": "dpo"})
        if final is not None:
            summary["kl"] = self.kl(final)
        return summary

    def run_eval(self):
        from .data.chat import plaintext_heldout_sequences

        e = self.cfg["eval"]
        d = self.write_stage_config("eval")
        path = self.final_model_dir()
        student = self.load(path).eval()
        chat = self.kl(student)
        plain = self.kl(student, plaintext_heldout_sequences(self.tokenizer(), e["plaintext_seqs"], e["seq_len"]))
        kv = student.config.kv_summary()
        result = {"model": str(path), "heldout_chat": chat, "plaintext": plain, "kv": kv}
        if e["proxy_tasks"]:
            result["proxy"] = self._proxy(student)
        del student
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if e["tasks"]:
            result["lm_eval"] = self._lm_eval(path, d)
        self._write_summary(result)
        return result

    def _teacher_eval_cmd(self, out_json: Path) -> list[str]:
        import sys

        e = self.cfg["eval"]
        cmd = [sys.executable, "-m", "zebra.cli", "eval", "--model", str(self.cfg["teacher"]),
               "--tasks", ",".join(e["tasks"]), "--json", str(out_json), "--device", str(self.device),
               "--jobs", str(e["jobs"])]
        return cmd + (["--limit", str(e["limit"])] if e["limit"] is not None else [])

    def start_teacher_eval(self) -> None:
        """Score the teacher on the lm-eval tasks in a background process while the student trains (it does not
        depend on training; lm-eval is mostly Python-bound, so it costs the GPU job little). The eval stage waits
        for it and scores only the student. GPU runs with eval.teacher_async only."""
        import subprocess

        e = self.cfg["eval"]
        d = self.stage_dir("eval")
        if not (e["tasks"] and e["teacher_async"] and self.device.type == "cuda") or self.done("eval"):
            return
        if (d / "teacher-eval.json").exists() or getattr(self, "_teacher_proc", None) is not None:
            return
        d.mkdir(parents=True, exist_ok=True)
        log = open(d / "teacher-eval.log", "w")
        self._teacher_proc = subprocess.Popen(self._teacher_eval_cmd(d / "teacher-eval.json"), stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        print(f"[zebra run] teacher lm-eval started in the background (pid {self._teacher_proc.pid})", flush=True)

    def _lm_eval(self, student_path: Path, d: Path) -> dict:
        """lm-eval of teacher and student -> eval/eval.json (the `zebra eval --json` format, teacher first, % of the
        teacher). The teacher's scores come from the background run when one was started."""
        from .eval.harness import evaluate_models
        from .eval.table import markdown_table, stderr_table, summarize

        e = self.cfg["eval"]
        proc = getattr(self, "_teacher_proc", None)
        tjson = d / "teacher-eval.json"
        if proc is not None:
            rc = proc.wait()
            if rc != 0:
                print(f"[zebra run] background teacher lm-eval failed (exit {rc}, {d / 'teacher-eval.log'}); "
                      "scoring the teacher now", flush=True)
        if tjson.exists():
            teacher = json.loads(tjson.read_text())
            res = evaluate_models([str(student_path)], e["tasks"], limit=e["limit"], device=str(self.device),
                                  jobs=e["jobs"])
            rows = summarize([teacher["models"][0], res["models"][0]], e["tasks"], 0)
            res["models"], res["reference"] = rows, teacher["reference"]
            res["table_markdown"] = markdown_table(rows, e["tasks"])
            res["stderr_markdown"] = stderr_table(rows, e["tasks"])
            res["teacher_seconds_background"] = teacher.get("seconds")
            (d / "eval.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        else:
            res = evaluate_models([self.cfg["teacher"], str(student_path)], e["tasks"], limit=e["limit"],
                                  device=str(self.device), jobs=e["jobs"], json_out=str(d / "eval.json"))
        return {"table_markdown": res["table_markdown"], "models": res["models"], "seconds": res.get("seconds")}

    def _proxy(self, student) -> dict:
        """Multiple-choice accuracy proxy (zebra.eval.quick) of the student and the teacher (the teacher scored once
        per process for a task set: ablations evaluate many students), with the student's % of the teacher."""
        from .eval.quick import QuickMC

        e = self.cfg["eval"]
        key = (str(self.cfg["teacher"]), tuple(e["proxy_tasks"]), e["proxy_limit"])
        if key not in _PROXY:
            quick = QuickMC.build(self.tokenizer(), tasks=key[1], limit=e["proxy_limit"])
            _PROXY[key] = (quick, quick.score(self.eval_teacher()))
        quick, teacher = _PROXY[key]
        student_s = quick.score(student)
        avg = "avg_acc_norm"
        return {"student": student_s, "teacher": teacher,
                "percent_of_teacher": 100 * student_s[avg] / teacher[avg] if teacher.get(avg) else None}

    def _write_summary(self, ev: dict) -> None:
        """RUN/summary.json: the headline numbers of the run (final student vs teacher) and stage times."""
        from .stages.trainer import atomic_write_text

        stage_s = {}
        for name in STAGES:
            p = self.stage_dir(name) / "summary.json"
            if p.exists():
                stage_s[name] = json.loads(p.read_text()).get("seconds")
        stage_s["eval"] = round(time.perf_counter() - self._stage_t0, 1)
        start = json.loads((self.out / "run_start.json").read_text())["time"]
        summary = {
            "student": {"model": ev["model"], "heldout_kl": ev["heldout_chat"]["kl"],
                        "top1": ev["heldout_chat"]["top1_agreement"], "heldout_ppl": ev["heldout_chat"]["ppl_student"],
                        "plaintext_ppl": ev["plaintext"]["ppl_student"], "plaintext_kl": ev["plaintext"]["kl"],
                        "kv_percent": ev["kv"]["kv_percent"]},
            "teacher": {"model": self.cfg["teacher"], "heldout_ppl": ev["heldout_chat"]["ppl_teacher"],
                        "plaintext_ppl": ev["plaintext"]["ppl_teacher"]},
            "plaintext_ppl_ratio": ev["plaintext"]["ppl_student"] / ev["plaintext"]["ppl_teacher"],
            "stage_seconds": stage_s,
            "total_seconds": round(time.time() - start, 1),
        }
        if "proxy" in ev:
            summary["proxy"] = ev["proxy"]
        if "lm_eval" in ev:
            summary["lm_eval"] = {r["model"]: {k: r.get(k) for k in ("scores", "average", "percent_of_reference",
                                                                    "task_percent_of_reference", "dev_tasks",
                                                                    "dev_percent_of_reference")}
                                  for r in ev["lm_eval"]["models"]}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")

    def run_report(self):
        from .stages.report import write_report

        self.write_stage_config("report")
        path = write_report(self.out, self.cfg)
        return {"report": str(path)}

    @staticmethod
    def is_main() -> bool:
        from .stages.parallel import is_main

        return is_main()

    def _say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[zebra run] {msg}", flush=True)

    def _out_problem(self) -> str | None:
        """Why the run folder cannot be made or written, found before any work (None: it can). The same checks as
        `zebra convert`'s --out, except that a folder with files in it is a run to resume."""
        from .convert.build import check_out_dir

        try:
            check_out_dir(self.out, True, self.cfg["base"])
        except ZebraError as e:
            return str(e)
        return None

    def _student_problem(self) -> str | None:
        """The student settings checked against the teacher before any work, named by their config keys (the layer
        lists, num_mla against the layer count, and the MLA ranks the conversion would refuse at init)."""
        from .convert.layout import student_config_from_teacher
        from .convert.teacher import load_teacher_config

        s = self.cfg["student"]
        tcfg = load_teacher_config(self.cfg["base"])
        L = int(tcfg["num_hidden_layers"])
        try:
            attention = _layer_list(s["attention_layers"], L, "student.attention_layers") or []
            fixed = _layer_list(s["mla_layers"], L, "student.mla_layers")
        except ZebraError as e:
            return str(e)
        if fixed is None and s["kv_budget"] is None and not 0 <= s["num_mla"] <= L - len(attention):
            return (f"config key 'student.num_mla' is {s['num_mla']}: the teacher has {L} layers"
                    + (f", {len(attention)} of them kept as attention" if attention else "")
                    + f", so at most {L - len(attention)} can be MLA")
        both = sorted(set(fixed or []) & set(attention))
        if both:
            return f"layers {both} are in both student.mla_layers and student.attention_layers"
        try:
            student_config_from_teacher(tcfg, list(range(L)), [], kv_rank=s["kv_rank"], q_rank=s["q_rank"],
                                        rope_dim=s["rope_dim"], nope_dim=s["nope_dim"])
        except ZebraError as e:
            msg = str(e)
            for flag in ("kv-rank", "q-rank", "rope-dim", "nope-dim"):
                msg = msg.replace(f"--{flag}", f"config key 'student.{flag.replace('-', '_')}'")
            return msg
        return None

    def _resume_conflict(self) -> str | None:
        """A re-run into a folder whose finished stages were computed from other settings would silently reuse them:
        say which stage and which settings instead."""
        from .ablate import _get, changed_stage

        prev = self.out / "run_config.json"
        if not prev.exists():
            return None
        try:
            old = json.loads(prev.read_text())
        except ValueError:
            return f"{prev} is not valid JSON: not a zebra run folder, or a damaged one; use another --out"
        hit = changed_stage(old, self.cfg, self.done)
        if hit is None:
            return None
        stage, keys = hit
        later = STAGES[STAGES.index(stage):]
        what = "; ".join(f"{k}: {_get(old, k)!r} -> {_get(self.cfg, k)!r}" for k in keys)
        return (f"{self.out} holds a run whose stage '{stage}' is finished with other settings ({what}); resuming would "
                f"reuse it. Use a new --out, or delete the folders of '{stage}' and the stages after it "
                f"({', '.join(later)}) in {self.out} to recompute them")

    def run(self, only: list[str] | None = None) -> Path:
        conflict = broadcast_object((self._out_problem() or self._student_problem() or self._resume_conflict())
                                    if self.rank == 0 else None)
        if conflict:
            raise ZebraError(conflict)
        # the data first: a missing, empty or corrupt source fails here, before any stage starts or writes (its
        # tokenised form is cached, so the stages that read it later pay nothing more)
        if not self.done("ild") and (not only or {"init", "ild"} & set(only)):
            self.stream("ild", self.cfg["ild"])
        st = self.cfg["distill"]
        if not self.done("distill") and (not only or "distill" in only):
            self.stream("kd", st, loss_on=st["loss_on"])
        if self.rank == 0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ZebraError(f"cannot create --out {self.out}: {e.strerror or e}") from None
            (self.out / "run_config.json").write_text(json.dumps(self.cfg, indent=2) + "\n")
            start = self.out / "run_start.json"
            if not start.exists():
                start.write_text(json.dumps({"time": time.time(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        barrier()
        fns = {"init": self.run_init, "ild": self.run_ild, "sensitivity": self.run_sensitivity,
               "smart": self.run_smart, "compose": self.run_compose, "distill": self.run_distill,
               "pairs": self.run_pairs, "dpo": self.run_dpo, "eval": self.run_eval, "report": self.run_report}
        for name in STAGES:
            if only and name not in only:
                continue
            # rank 0 decides (broadcast): another rank looking at DONE itself could race rank 0 finishing a stage
            if broadcast_object(self.done(name)) and name != "report":
                self._say(f"{name}: done, skipping")
                continue
            if name == "distill" and not (only and "eval" not in only) and self.rank == 0:
                self.start_teacher_eval()
            self._say(f"{name} ...")
            self._stage_t0 = time.perf_counter()
            if name in TRAINED or self.rank == 0:  # training stages on every rank, the others on rank 0 alone
                summary = fns[name]()
                if self.rank == 0:
                    summary["seconds"] = round(time.perf_counter() - self._stage_t0, 1)
                    if name in TRAINED and self.world > 1:
                        summary["world_size"] = self.world
                    self.mark_done(name, summary)
                    self._say(f"{name}: done in {summary['seconds']}s")
            barrier()
        return self.out / "report.md"
