"""Verb ``models``: the model presets ``--model`` accepts, with the facts their cases use."""

from __future__ import annotations

from opbench.harness import models
from opbench.harness.models.cases import model_cases

from .common import load_model


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "models", help="list the model presets of --model (public facts from each model's"
                       " Hugging Face config.json) and their case counts")
    parser.add_argument("model", nargs="?", default=None, metavar="NAME|config.json",
                        help="show one preset or config.json instead of all presets")
    parser.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    refs = [args.model] if args.model else models.preset_names()
    print(f"{'model':18s} {'heads':>6s} {'head':>4s} {'rope':>4s} {'pairs':6s} {'max ctx':>7s}"
          f" {'cases':>5s}  layers (rope, window), softcap, sinks")
    for ref in refs:
        model = load_model(ref)
        facts = models.summary(model)
        extras = [f"softcap {model.softcap:g}"] if model.softcap else []
        extras += ["sinks"] if model.sinks else []
        extras += [f"mrope {list(model.mrope_section)}"] if model.mrope_section else []
        cases = len(model_cases(ref))
        print(f"{ref:18s} {facts['heads']:>6s} {model.head_dim:4d} {model.rope_dim:4d} "
              f"{model.mode:6s} {model.max_ctx:7d} {cases:5d}  "
              f"{'; '.join([facts['layers'], *extras])}")
    return 0
