"""mlpe.sdk: what a training script imports to run under `mlpe control` (and, unchanged,
under plain torchrun or python):

    from mlpe import sdk

    run = sdk.start()                       # identity, device, process group
    state = {"model": model, "optimizer": optimizer}
    step = run.load(state)                  # newest good checkpoint; 0 when none
    while step < steps:
        d = run.poll()                      # pause / stop / checkpoint / preempt
        if d.checkpoint or d.preempt:
            run.save(step, state)
        if d.stop or d.preempt:
            break
        if d.pause:
            continue
        step += 1
        loss = train_one_step()
        run.report(step, loss=loss.item(), tokens=tokens_per_step)
    run.save(step, state)
    sys.exit(run.finish())

See `run.py` for the details and the README's "Your own training code" section.
"""

from mlpe.sdk.run import EXIT_PREEMPTED, Decision, Run, start

__all__ = ["EXIT_PREEMPTED", "Decision", "Run", "start"]
