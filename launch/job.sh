# shellcheck shell=bash
# The common body of launch/*.sbatch (sourced by them; not a job script on its own). The .sbatch
# files hold the #SBATCH headers and the stage's defaults, then call `ferrofold_job`. All training
# logic lives in the binary; this file only checks inputs, sets the environment, runs the preflight
# and the job step, forwards the checkpoint signal, and requeues.
#
# What one attempt of a job does:
#   1. check the inputs (run dir, binary, configs, launcher) and fail fast with a clear message;
#   2. send its own output to RUN_DIR/logs/job<JOBID>.attempt<N>.log (N = $SLURM_RESTART_COUNT,
#      0 for the first attempt); Slurm's --output file gets a one-line summary per attempt;
#   3. preflight: `LAUNCH ferrofold info --check CONFIG_ARGS` on every rank (same version, same
#      config hash, a correct all-reduce); on failure the job stops here;
#   4. the job step: `LAUNCH ferrofold $FERROFOLD_CMD CONFIG_ARGS $FERROFOLD_CMD_ARGS`, in the
#      background, with SIGUSR1 to the batch shell (#SBATCH --signal=B:USR1@S) forwarded to it;
#   5. exit status $FERROFOLD_REQUEUE_EXIT ("checkpointed on signal") → `scontrol requeue`; the next
#      attempt resumes from the run dir. Not when Slurm sent SIGTERM to this shell (scancel,
#      preemption, time limit): a cancel must stay a cancel, and Slurm requeues preempted jobs
#      itself. Any other status ends the job with that status.
#
# Variables (the .sbatch files check the required ones up front):
#   FERROFOLD_RUN_DIR     required. Run directory: resolved config, checkpoints, metrics, logs/.
#   FERROFOLD_HOME        the ferrofold checkout (configs/, launch/, target/). Default: the directory
#                         sbatch was called from ($SLURM_SUBMIT_DIR). Relative config paths are
#                         relative to it; a relative FERROFOLD_RUN_DIR is relative to the submit dir.
#   FERROFOLD_BIN         the binary. Default: $FERROFOLD_HOME/target/release/ferrofold.
#   FERROFOLD_CMD         the subcommand of the job step. Default: train.
#   FERROFOLD_CONFIGS     config files, layered in order (space-separated). Default: per .sbatch.
#   FERROFOLD_EXTRA_ARGS  extra arguments for the preflight AND the job step, e.g.
#                         "--set optim.lr=5e-4 --set train.max_steps=1000" (space-separated).
#   FERROFOLD_CMD_ARGS    extra arguments for the job step only (flags `info` does not know).
#   FERROFOLD_LAUNCHER    srun (default) | mpirun. See "srun or mpirun" below.
#   FERROFOLD_SRUN_ARGS / FERROFOLD_MPIRUN_ARGS   extra launcher arguments.
#   FERROFOLD_PREFLIGHT   1 (default) | 0 to skip the preflight step.
#   FERROFOLD_REQUEUE     1 (default) | 0: never requeue (timed MLPerf runs).
#   FERROFOLD_REQUEUE_EXIT  the trainer's "checkpointed on signal, please requeue" exit status: 75 (`ferrofold::train::EXIT_STOPPED`, EX_TEMPFAIL).
#   FERROFOLD_MAX_RESTARTS  give up (fail) instead of requeueing after this many restarts: 20.
#
# srun or mpirun (FERROFOLD_LAUNCHER):
#   srun    (default) `srun --mpi=pmix`: Slurm starts and tracks every rank (signals, accounting,
#           cleanup, --kill-on-bad-exit), Open MPI wires up through Slurm's PMIx server. Needs a Slurm
#           built with PMIx (`srun --mpi=list` shows pmix; checked below) and an MPI built with PMIx.
#   mpirun  when srun cannot start MPI ranks: Slurm without PMIx, or an MPI built without PMI
#           support for this Slurm (ranks then come up as singletons: ferrofold says "topology from
#           slurm env ... MPI world is 1" and the preflight fails), or to use MPI-specific mapping.
#           Open MPI's mpirun reads the allocation from Slurm and starts its daemons with srun.
#
# GPU binding: ferrofold picks GPU (local rank mod visible GPUs) itself, local rank = rank among the
# processes on the node. So either every rank sees all GPUs of its node (srun --gpu-bind=none, the
# default with --gpus-per-node) or exactly one (--gpus-per-task=1: it is device 0 for that rank);
# both give one rank per GPU. Keep --ntasks-per-node equal to the GPUs per node.
#
# Signals: the .sbatch files use --signal=B:USR1@S, i.e. Slurm signals only this batch shell, which
# forwards SIGUSR1 to the launcher (srun and mpirun both pass SIGUSR1 on to every rank). We chose B:
# over a plain --signal=USR1@S (Slurm signals the tasks of job steps, not the batch shell) because it
# works the same for both launchers (with mpirun the ranks on the batch node belong to the batch step,
# which a plain --signal does not reach), because the batch shell learns that the time is up (a
# signal before the job step started means: requeue without starting it), and because the signal
# cannot reach the preflight step, where SIGUSR1 would simply kill `ferrofold info`. SIGTERM (scancel,
# preemption, time limit) is sent by Slurm to every step itself; the batch shell just keeps waiting
# for the job step so it can still requeue.

ferrofold_die() {
  echo "ferrofold job: error: $*" >&2
  # Also into Slurm's --output file once stdout went to the attempt log (fd 3 is then open).
  { [ -n "${FERROFOLD_LOG:-}" ] && echo "ferrofold job: error: $*" >&3; } 2>/dev/null || true
  exit 1
}

ferrofold_log() {
  echo "ferrofold job [$(date -u +%FT%TZ)]: $*"
}

# Run a job step in the background and wait for it, forwarding SIGUSR1 to it while it runs.
# Sets FERROFOLD_STEP_RC.
ferrofold_step() {
  "$@" &
  FERROFOLD_STEP_PID=$!
  while :; do
    set +e
    wait "$FERROFOLD_STEP_PID"
    FERROFOLD_STEP_RC=$?
    set -e
    # A trapped signal interrupts `wait` with status > 128 while the step still runs: wait again.
    if [ "$FERROFOLD_STEP_RC" -gt 128 ] && kill -0 "$FERROFOLD_STEP_PID" 2>/dev/null; then
      continue
    fi
    break
  done
  FERROFOLD_STEP_PID=
}

ferrofold_on_usr1() {
  FERROFOLD_SIGNALLED=1
  if [ -n "${FERROFOLD_STEP_PID:-}" ] && [ "${FERROFOLD_IN_JOB_STEP:-0}" = 1 ]; then
    ferrofold_log "SIGUSR1 (time limit near): forwarding to the job step (pid $FERROFOLD_STEP_PID)"
    kill -USR1 "$FERROFOLD_STEP_PID" 2>/dev/null || true
  elif [ "${FERROFOLD_IN_JOB_STEP:-0}" = 1 ]; then
    # The step is being forked right now; its ranks may not handle USR1 yet. It stops on SIGTERM.
    ferrofold_log "SIGUSR1 (time limit near) while the job step starts: not forwarded"
  else
    ferrofold_log "SIGUSR1 (time limit near) before the job step: it will not be started"
  fi
}

ferrofold_on_term() {
  FERROFOLD_TERMINATED=1
  ferrofold_log "SIGTERM (cancelled, preempted or out of time): Slurm signals the steps itself"
}

# Append one line to RUN_DIR/attempts.tsv: job, attempt, start, end, status, outcome.
ferrofold_record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$SLURM_JOB_ID" "$FERROFOLD_ATTEMPT" "$FERROFOLD_T0" \
    "$(date -u +%FT%TZ)" "$1" "$2" >>"$FERROFOLD_RUN_DIR/attempts.tsv"
  echo "ferrofold job $SLURM_JOB_ID attempt $FERROFOLD_ATTEMPT: $2 (status $1); log $FERROFOLD_LOG" >&3
}

ferrofold_job() {
  set -euo pipefail
  [ -n "${SLURM_JOB_ID:-}" ] || ferrofold_die "not inside a Slurm job: submit with sbatch"
  : "${FERROFOLD_RUN_DIR:?set FERROFOLD_RUN_DIR to the run directory}"
  : "${FERROFOLD_CONFIGS:?set FERROFOLD_CONFIGS to the config files to layer}"
  FERROFOLD_HOME=$(cd "${FERROFOLD_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd)
  FERROFOLD_BIN=${FERROFOLD_BIN:-$FERROFOLD_HOME/target/release/ferrofold}
  FERROFOLD_CMD=${FERROFOLD_CMD:-train}
  FERROFOLD_LAUNCHER=${FERROFOLD_LAUNCHER:-srun}
  FERROFOLD_PREFLIGHT=${FERROFOLD_PREFLIGHT:-1}
  FERROFOLD_REQUEUE=${FERROFOLD_REQUEUE:-1}
  FERROFOLD_REQUEUE_EXIT=${FERROFOLD_REQUEUE_EXIT:-75}
  FERROFOLD_MAX_RESTARTS=${FERROFOLD_MAX_RESTARTS:-20}
  FERROFOLD_ATTEMPT=${SLURM_RESTART_COUNT:-0}
  FERROFOLD_T0=$(date -u +%FT%TZ)
  FERROFOLD_SIGNALLED=0
  FERROFOLD_TERMINATED=0
  FERROFOLD_IN_JOB_STEP=0
  FERROFOLD_STEP_PID=
  FERROFOLD_LOG=

  # Run dir (relative to the submit dir), then work from the checkout.
  mkdir -p "$FERROFOLD_RUN_DIR/logs" || ferrofold_die "cannot create run dir $FERROFOLD_RUN_DIR"
  FERROFOLD_RUN_DIR=$(cd "$FERROFOLD_RUN_DIR" && pwd)
  cd "$FERROFOLD_HOME"
  FERROFOLD_LOG=$FERROFOLD_RUN_DIR/logs/job$SLURM_JOB_ID.attempt$FERROFOLD_ATTEMPT.log
  # Slurm's --output keeps the summary lines (fd 3); everything else goes to this attempt's log.
  exec 3>&1
  echo "ferrofold job $SLURM_JOB_ID attempt $FERROFOLD_ATTEMPT: logging to $FERROFOLD_LOG"
  exec >>"$FERROFOLD_LOG" 2>&1
  trap ferrofold_on_usr1 USR1
  trap ferrofold_on_term TERM

  ferrofold_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-?}) attempt $FERROFOLD_ATTEMPT on ${SLURM_JOB_NODELIST:-?}:" \
    "${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS:-1} task(s), ${SLURM_CPUS_PER_TASK:-1} cpu(s)/task"
  ferrofold_log "run dir $FERROFOLD_RUN_DIR; checkout $FERROFOLD_HOME; launcher $FERROFOLD_LAUNCHER"

  # Inputs.
  [ -x "$FERROFOLD_BIN" ] || ferrofold_die "no ferrofold binary at $FERROFOLD_BIN (cargo build --release, or set FERROFOLD_BIN)"
  local args=() extra=() cmd_args=() launch=() f
  for f in $FERROFOLD_CONFIGS; do
    [ -f "$f" ] || ferrofold_die "config file $f not found (relative to $FERROFOLD_HOME)"
    args+=(--config "$f")
  done
  read -r -a extra <<<"${FERROFOLD_EXTRA_ARGS:-}"
  read -r -a cmd_args <<<"${FERROFOLD_CMD_ARGS:-}"
  args+=(${extra[@]+"${extra[@]}"} --run-dir "$FERROFOLD_RUN_DIR")

  # Environment of the ranks.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$OMP_NUM_THREADS}
  # NVLink SHARP (NVLS, multicast) off: it needs multicast support from the fabric manager / IMEX
  # that many clusters and containers lack (NCCL init then fails or hangs), and it reserves GPU memory.
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
  if [ "$(id -u)" = 0 ]; then
    # Open MPI refuses to run as root (containers) unless told.
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi

  # Launcher.
  local more=()
  case $FERROFOLD_LAUNCHER in
    srun)
      local mpi_list
      mpi_list=$(srun --mpi=list 2>&1 || true)
      [[ $mpi_list == *pmix* ]] ||
        ferrofold_die "this Slurm has no PMIx (srun --mpi=list): use FERROFOLD_LAUNCHER=mpirun"
      read -r -a more <<<"${FERROFOLD_SRUN_ARGS:-}"
      # Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: without this every rank
      # of the step would get one core.
      if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
      launch=(srun --mpi=pmix --kill-on-bad-exit=1 ${more[@]+"${more[@]}"})
      ;;
    mpirun)
      command -v mpirun >/dev/null || ferrofold_die "mpirun not found"
      read -r -a more <<<"${FERROFOLD_MPIRUN_ARGS:-}"
      # Open MPI 4.x races when two mpiruns on one node create the shared per-user session
      # directory at once ("A call to mkdir was unable to create ... File exists", open-mpi/ompi#8510;
      # job arrays, shared nodes): a session base per job and attempt, removed when the batch
      # script exits (on other nodes Open MPI empties it; the empty directory stays).
      if [ -z "${OMPI_MCA_orte_tmpdir_base:-}" ]; then
        export OMPI_MCA_orte_tmpdir_base=${TMPDIR:-/tmp}/ferrofold-ompi.${SLURM_JOB_ID:-$$}.$FERROFOLD_ATTEMPT
        trap 'rm -rf "$OMPI_MCA_orte_tmpdir_base"' EXIT
      fi
      launch=(mpirun -np "${SLURM_NTASKS:-1}" --bind-to none ${more[@]+"${more[@]}"})
      ;;
    *) ferrofold_die "FERROFOLD_LAUNCHER must be srun or mpirun, not '$FERROFOLD_LAUNCHER'" ;;
  esac
  ferrofold_log "OMP_NUM_THREADS=$OMP_NUM_THREADS NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"

  # Preflight: same binary and config on every rank, working collectives.
  if [ "$FERROFOLD_PREFLIGHT" = 1 ]; then
    ferrofold_log "preflight: ${launch[*]} $FERROFOLD_BIN info --check ${args[*]}"
    local pre_out=$FERROFOLD_RUN_DIR/logs/.preflight.$SLURM_JOB_ID.$FERROFOLD_ATTEMPT
    ferrofold_step "${launch[@]}" "$FERROFOLD_BIN" info --check "${args[@]}" >"$pre_out" 2>&1
    cat "$pre_out"
    # srun can exit 0 without having started the ranks (a failed step launch): also require rank
    # 0's verdict naming every rank.
    if [ "$FERROFOLD_STEP_RC" = 0 ] && ! grep -q "^preflight ok: ${SLURM_NTASKS:-1} ranks" "$pre_out"; then
      ferrofold_log "the preflight step did not report 'preflight ok: ${SLURM_NTASKS:-1} ranks' (ranks not started?)"
      FERROFOLD_STEP_RC=1
    fi
    rm -f "$pre_out"
    if [ "$FERROFOLD_STEP_RC" != 0 ]; then
      ferrofold_log "preflight FAILED (status $FERROFOLD_STEP_RC): not starting '$FERROFOLD_CMD'"
      ferrofold_record "$FERROFOLD_STEP_RC" "preflight failed"
      exit "$FERROFOLD_STEP_RC"
    fi
    ferrofold_log "preflight passed"
  fi

  # The job step.
  local rc
  if [ "$FERROFOLD_SIGNALLED" = 1 ]; then
    rc=$FERROFOLD_REQUEUE_EXIT
  else
    ferrofold_log "job step: ${launch[*]} $FERROFOLD_BIN $FERROFOLD_CMD ${args[*]} ${cmd_args[*]+${cmd_args[*]}}"
    FERROFOLD_IN_JOB_STEP=1
    ferrofold_step "${launch[@]}" "$FERROFOLD_BIN" "$FERROFOLD_CMD" "${args[@]}" ${cmd_args[@]+"${cmd_args[@]}"}
    FERROFOLD_IN_JOB_STEP=0
    rc=$FERROFOLD_STEP_RC
    ferrofold_log "job step exited with status $rc"
  fi

  if [ "$rc" = "$FERROFOLD_REQUEUE_EXIT" ]; then
    if [ "$FERROFOLD_REQUEUE" != 1 ]; then
      ferrofold_record "$rc" "checkpointed on signal; requeue disabled"
      exit "$rc"
    fi
    local state
    state=$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null || true)
    if [ "$FERROFOLD_TERMINATED" = 1 ] || { [ -n "$state" ] && [ "$state" != RUNNING ]; }; then
      # scancel, or preemption (Slurm requeues preempted jobs itself), or past the time limit:
      # requeueing here would undo a cancel.
      ferrofold_log "checkpointed, but the job was terminated by Slurm (state ${state:-?}): not requeueing"
      ferrofold_record "$rc" "checkpointed on SIGTERM; not requeued"
      exit "$rc"
    fi
    if [ "$FERROFOLD_ATTEMPT" -ge "$FERROFOLD_MAX_RESTARTS" ]; then
      ferrofold_log "already restarted $FERROFOLD_ATTEMPT times (FERROFOLD_MAX_RESTARTS): not requeueing"
      ferrofold_record "$rc" "checkpointed on signal; restart limit reached"
      exit "$rc"
    fi
    ferrofold_log "checkpointed on signal: requeueing job $SLURM_JOB_ID (the next attempt resumes)"
    ferrofold_record "$rc" "requeued"
    # Slurm ends this attempt (SIGTERM to this shell) and queues the job again (same id, eligible
    # after Slurm's requeue delay). Nothing may run after this.
    scontrol requeue "$SLURM_JOB_ID" || {
      ferrofold_log "scontrol requeue failed"
      exit "$rc"
    }
    exit 0
  fi
  if [ "$rc" = 0 ]; then
    ferrofold_record 0 "completed"
  else
    ferrofold_record "$rc" "failed"
  fi
  exit "$rc"
}
