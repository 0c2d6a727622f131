"""Every layout the planner prices, fitting or not, as the markdown table in docs/performance.md:

    python -m janus_pretrain.bench plan --model large --objective janus --gpus 64 \\
        --global-batch 2048 --tokens 2.1e12

the arguments of `janus-pretrain plan` (janus_pretrain/plan.py), with every layout listed.
"""
from janus_pretrain.errors import run_cli
from janus_pretrain.plan import main as plan_main
from janus_pretrain.plan import parser


def main(argv: list[str]) -> None:
    args = parser().parse_args([*argv, "--all", "--top", "0"])
    run_cli(plan_main, args)
