"""--report-to tensorboard: a run's scalars as TensorBoard event files, without PyTorch.

torch.utils.tensorboard.SummaryWriter would pull in PyTorch; TensorBoard's own event-file
writer and protos (the `tensorboard` package) are all a scalar log needs. Tags follow the
HF Trainer's (train/loss, eval/loss, train/learning_rate). A resumed run starts its file
with a SessionLog START at the first step it redoes, as SummaryWriter(purge_step=) does:
TensorBoard then drops the older events from that step on, so the curves go on without
the steps the interrupted run logged after its last checkpoint appearing twice.
"""
import time
from pathlib import Path


class TensorBoardLog:
    def __init__(self, folder, purge_step=None):
        try:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            raise RuntimeError("--report-to tensorboard needs TensorBoard: pip install tensorboard "
                               "(or leave out --report-to)") from None
        self.Event, self.Summary = Event, Summary
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(folder))
        if purge_step is not None:
            self.writer.add_event(Event(step=purge_step, wall_time=time.time(),
                                        session_log=SessionLog(status=SessionLog.START)))

    def scalars(self, step, values):
        """values: {tag: number} at optimizer step `step`."""
        summary = self.Summary(value=[self.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self.writer.add_event(self.Event(step=step, wall_time=time.time(), summary=summary))

    def close(self):
        self.writer.close()


class NoLog:
    """--report-to none."""
    def scalars(self, step, values):
        pass

    def close(self):
        pass
