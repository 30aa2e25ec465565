rule teacher:
    output:
        ckpt="checkpoints/seed{seed}/teacher.pt",
        metrics="checkpoints/seed{seed}/teacher.csv",
    log:
        "logs/teacher/seed{seed}.log",
    benchmark:
        "benchmarks/teacher/seed{seed}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=keys("dataset", "runtime", "teacher", "evaluate.batch_size"),
        args=args,
    shell:
        job("teacher")
