"""Train and evaluate QEEPS / OIM person-search models (the Detectron2 way): the code of
``projects/QEEPS/train_net.py``, also runnable wherever the package is installed as
``qeeps-train`` or ``python -m qeeps_d2.engine.train_cli`` (same arguments).

A bad config file, unknown key, unknown data set or data set file of the wrong layout, and
weights that cannot be read (or, with --eval-only, do not fit the config's model: missing or
unused keys) are reported in one line (exit status 2) before anything is written to OUTPUT_DIR.
Training loads weights that fit in part (e.g. a QEEPS model from OIM weights) and logs, in one
line, which groups of layers start fresh.
"""
from detectron2.engine import default_argument_parser, launch

from qeeps_d2.checkpoint import CheckpointError, QEEPSCheckpointer
from qeeps_d2.engine.input_checks import check_train_net_inputs
from qeeps_d2.engine.trainer import Trainer, setup_cfg
from qeeps_d2.utils.cli import exit_on_user_error

__all__ = ["main", "invoke_main"]


def main(args):
    """Train (or with ``--eval-only`` evaluate) as ``args`` (Detectron2's argument parser) say."""
    cfg = setup_cfg(args.config_file, args.opts, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        QEEPSCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    """Parse the command line, check its inputs, then launch :func:`main` on every process."""
    args = default_argument_parser().parse_args()
    exit_on_user_error("train_net.py", check_train_net_inputs, args.config_file, args.opts,
                       args.eval_only, args.resume,
                       user_errors=(ValueError, OSError, CheckpointError))
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
