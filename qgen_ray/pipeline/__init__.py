"""Orchestration of a study, in the order data flows through it:

    study       the grid a study script declares (`Study`), checked whole by `plan()`
    study_cli   the flags of every study script; runs the stages it names
    collect     trial folders -> trials / history / steps tables
    followups   the stages after training: measure, corrupt, landscape, report
    jobs        the work of one model in each follow-up stage (Ray-free functions)

Training and the follow-up fan-out run through the Ray adapters in `qgen_ray.ray`.
"""
