"""``minorsft bench``'s worker: one mode in a fresh process (``python -m llamafactory_minorsft.bench.worker SPEC
RESULT``), its step (or evaluation batch) times, parameter bytes and reference copy written to RESULT as JSON."""

import json
import resource
import sys
import time
from pathlib import Path


def worker(spec_path: str, result_path: str) -> None:
    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    cuda = torch.cuda.is_available()
    result = {"step_s": [], "step_cpu_s": [], "import_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        last = last_cpu = None

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            result["num_params"] = sum(p.numel() for p in model.parameters())
            result["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            if spec["time_forward_pass"]:  # one no-grad forward over the training set, for comparison
                was_training, started, started_cpu = model.training, now(), time.process_time()
                model.eval()
                with torch.no_grad():
                    for batch in train_dataloader:
                        model(**{k: v for k, v in batch.items() if k != "labels"})
                model.train(was_training)
                result["forward_pass_s"] = now() - started
                result["forward_pass_cpu_s"] = time.process_time() - started_cpu

        def on_step_end(self, args, state, control, **kwargs):
            ended, ended_cpu = now(), time.process_time()
            if state.global_step > spec["warmup"]:
                result["step_s"].append(ended - self.last)
                result["step_cpu_s"].append(ended_cpu - self.last_cpu)
            self.last, self.last_cpu = ended, ended_cpu

        def on_prediction_step(self, args, state, control, model=None, **kwargs):
            # An evaluation mode: each batch of the evaluation is one "step"; the first `warmup` are not timed.
            ended, ended_cpu = now(), time.process_time()
            self.batches = getattr(self, "batches", 0) + 1
            if self.batches == 1:
                result["num_params"] = sum(p.numel() for p in model.parameters())
                result["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            if self.batches > spec["warmup"]:
                result["step_s"].append(ended - self.last)
                result["step_cpu_s"].append(ended_cpu - self.last_cpu)
            self.last, self.last_cpu = ended, ended_cpu

        def on_evaluate(self, args, state, control, **kwargs):
            self.batches = 0

    from llamafactory.train.dpo.trainer import CustomDPOTrainer
    from llamafactory_minorsft.train.trainer import MinorSFTTrainer

    def recording_the_reference(method):
        def recording(self, *args, **kwargs):
            # The memory bound of an online copy is SFT + *its* weights (bf16 under autocast, else the policy's
            # dtype); a precomputed DPO run is bound by online DPO less them.
            if self.ref_model is not None:
                parameters = list(self.ref_model.parameters())
                result["ref_param_bytes"] = sum(p.numel() * p.element_size() for p in parameters)
                result["ref_dtype"] = str(parameters[0].dtype)
            return method(self, *args, **kwargs)

        return recording

    # LLaMA-Factory's DPO trainer (also under the plugin's, which subclasses it) and the plugin's SFT trainer.
    for trainer_cls in (CustomDPOTrainer, MinorSFTTrainer):
        trainer_cls.train = recording_the_reference(trainer_cls.train)
    MinorSFTTrainer.evaluate = recording_the_reference(MinorSFTTrainer.evaluate)
    run_exp(args=spec["args"], callbacks=[StepTimer()])
    caches = list(Path(spec["args"]["output_dir"]).glob("ref_logps-*.pt"))
    if caches:
        stored = torch.load(caches[0], weights_only=True)
        result["precompute_s"], result["precompute_cpu_s"] = float(stored["seconds"]), float(stored["cpu_seconds"])
    if cuda:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
