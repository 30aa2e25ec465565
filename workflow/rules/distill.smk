# kd.archs is the grid (the arch wildcard), not a value the job reads.
KD_KEYS = section_keys("kd", grid=("archs",))


rule distill:
    input:
        teacher=rules.teacher.output.ckpt,
    output:
        ckpt="checkpoints/seed{seed}/distill/{arch}.pt",
        metrics="checkpoints/seed{seed}/distill/{arch}.csv",
    log:
        "logs/distill/seed{seed}/{arch}.log",
    benchmark:
        "benchmarks/distill/seed{seed}/{arch}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=keys(
            "dataset",
            "runtime",
            *KD_KEYS,
            "evaluate.batch_size",
        ),
        args=args,
    shell:
        job("distill")
