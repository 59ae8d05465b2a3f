"""Run `train_model.main(argv)`, but SIGKILL this process in the middle of deleting a checkpoint.

Used by test_long_runs.py: the first time shutil.rmtree is asked to remove a directory that holds a
complete checkpoint (model.safetensors and training_state.pt), it removes model.safetensors, as rmtree
may do first, and the process kills itself with SIGKILL, as the OOM killer or `kill -9` would.

    python tests/crash_during_save.py --data_path ... --save_interval 1 --save_total_limit 1
"""
import os
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoints  # noqa: E402
import train_model  # noqa: E402

_rmtree = shutil.rmtree


def rmtree_then_die(path, *args, **kwargs):
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(weights) and os.path.isfile(os.path.join(path, checkpoints.STATE_FILE)):
        os.remove(weights)
        os.kill(os.getpid(), signal.SIGKILL)
    return _rmtree(path, *args, **kwargs)


if __name__ == "__main__":
    shutil.rmtree = rmtree_then_die
    train_model.main(sys.argv[1:])
