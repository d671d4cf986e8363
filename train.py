"""Entry point: ``torchrun --nproc_per_node N train.py loss=sft model=tiny datasets=[toy_add] ...``

Also runs as plain ``python train.py ...`` (a world of one). Hydra composes ``config/config.yaml``
with a ``model/`` and a ``loss/`` file; the loss names the trainer class that runs it.
"""

import os
import uuid

import hydra
from omegaconf import OmegaConf

import distributed


def run_id() -> str:
    """The same on every rank of a launch: torchrun's rendezvous id (slurm passes its job id), or,
    for a single process, a fresh id."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID")
    if rid and rid != "none":
        return rid
    return os.environ.setdefault("TRAIN_RUN_ID", uuid.uuid4().hex[:8])


OmegaConf.register_new_resolver("run_id", run_id, replace=True)


def main(cfg):
    device = distributed.init(cfg.dist_timeout_minutes)
    trainer = None
    try:
        distributed.setup_logging(None)
        from trainers import TRAINERS

        if cfg.loss.trainer not in TRAINERS:
            raise ValueError(f"loss.trainer={cfg.loss.trainer!r} is not one of {sorted(TRAINERS)}")
        os.makedirs(cfg.run_dir, exist_ok=True)
        distributed.setup_logging(os.path.join(cfg.run_dir, "train.log"))
        trainer = TRAINERS[cfg.loss.trainer](cfg, device)
        trainer.train()
    finally:
        if trainer is not None and trainer.sampler is not None:
            trainer.sampler.close()  # collective; vLLM's shutdown takes the process group down with it
        distributed.close()


@hydra.main(version_base=None, config_path="config", config_name="config")
def hydra_main(cfg):
    main(cfg)


if __name__ == "__main__":
    hydra_main()
