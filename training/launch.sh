#!/bin/bash
# Multi-node DDP training under SLURM: one task per GPU, launched by srun.
# This is a template: render it with `python -m expvl.training.slurm --nodes N --gpus-per-node G --config ...`
# (training/slurm.py); the upper-case fields between @ signs are
# filled in, everything else is plain bash.
#
# Requeue (Lightning 2.6, checked in lightning/fabric/plugins/environments/slurm.py and
# lightning/pytorch/trainer/connectors/signal_connector.py):
# - srun sets SLURM_NTASKS, so `SLURMEnvironment.detect()` is true and Lightning takes rank, local rank,
#   node rank and world size from SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID / SLURM_NTASKS, the master
#   address from the first host of SLURM_NODELIST and the port from the job id (MASTER_PORT overrides).
#   `validate_settings` fails if trainer.devices != --ntasks-per-node or trainer.num_nodes != --nodes.
# - `--signal=SIGUSR1@<s>` makes SLURM send SIGUSR1 to every task <s> seconds before the time limit.
#   SLURMEnvironment(auto_requeue=True) is the default, so `_SignalConnector` handles it: every rank
#   saves `<default_root_dir>/hpc_ckpt_<n>.ckpt` and rank 0 runs `scontrol requeue $SLURM_JOB_ID`.
#   `--requeue` allows that (some clusters forbid requeue by default); SIGTERM is then ignored.
# - The requeued job runs this same script again: train.py skips finished steps, and Lightning
#   restores hpc_ckpt_<n>.ckpt when `fit` gets ckpt_path=None (`_parse_ckpt_path`).
# A job name "bash" or "interactive" turns SLURM detection off: do not use those names.
#
#SBATCH --job-name=@JOB_NAME@
#SBATCH --nodes=@NODES@
#SBATCH --ntasks-per-node=@GPUS_PER_NODE@
#SBATCH --gpus-per-node=@GPUS_PER_NODE@
#SBATCH --cpus-per-task=@CPUS_PER_TASK@
#SBATCH --time=@TIME@
#SBATCH --signal=SIGUSR1@@SIGNAL_SECONDS@
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=@LOG@
@SBATCH_EXTRA@
set -euo pipefail

# Paths come from the environment (sbatch exports it, srun passes it on to every task); the recipes
# read them with ${oc.env:...}: RUN_DIR, DATA_ROOT, EVA_VIT_G, BERT_VOCAB, BLIP2_STAGE1, INSTRUCTBLIP,
# LLM_DIR, LLM_TOKENIZER. The ones this job needs must be set:
for var in @REQUIRED_ENV@; do
    if [[ -z "${!var:-}" ]]; then
        echo "launch.sh: environment variable $var is not set" >&2
        exit 2
    fi
done

@SETUP@
cd "${REPO_DIR:-$SLURM_SUBMIT_DIR}"  # the repository holding train.py
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: run_dir=${RUN_DIR:-}"

# EXTRA_OVERRIDES: more key=value overrides, space separated (word splitting intended)
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "${PYTHON:-python}" train.py @CONFIG_ARGS@ trainer.devices=@GPUS_PER_NODE@ trainer.num_nodes=@NODES@ trainer.strategy=ddp trainer.accelerator=gpu trainer.precision=@PRECISION@ @OVERRIDES@ ${EXTRA_OVERRIDES:-}
