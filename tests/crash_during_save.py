"""Run `train_model.main(argv)`, but SIGKILL this process in the middle of deleting a checkpoint.

Used by test_long_runs.py. However a directory is deleted (shutil.rmtree, a loop of os.remove, pathlib), its
files go through os.unlink or os.remove. The first time either is asked to remove a file from a directory
named checkpoint-* that holds a complete checkpoint (model.safetensors and training_state.pt), the weights
are removed, as a deletion may do first, "killed while deleting DIR" goes to stderr, and the process kills
itself with SIGKILL, as the OOM killer or `kill -9` would.

    python tests/crash_during_save.py --data_path ... --save_interval 1 --save_total_limit 1
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoints  # noqa: E402
import train_model  # noqa: E402

WEIGHTS = "model.safetensors"


def dying(remove):
    def remove_then_die(path, *args, dir_fd=None, **kwargs):
        folder = os.path.dirname(os.fsdecode(path))
        if dir_fd is not None:  # shutil.rmtree removes each file by its name in a directory it holds open
            folder = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), folder)
        folder = os.path.abspath(folder)
        if os.path.basename(folder).startswith("checkpoint-") and os.path.isfile(os.path.join(folder, WEIGHTS)) \
                and os.path.isfile(os.path.join(folder, checkpoints.STATE_FILE)):
            original_remove(os.path.join(folder, WEIGHTS))
            print(f"killed while deleting {folder}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return remove(path, *args, dir_fd=dir_fd, **kwargs)
    return remove_then_die


if __name__ == "__main__":
    original_remove = os.unlink
    os.unlink, os.remove = dying(os.unlink), dying(os.remove)
    train_model.main(sys.argv[1:])
