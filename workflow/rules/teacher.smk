rule teacher:
    output:
        ckpt="checkpoints/teacher.pt",
        metrics="checkpoints/teacher.csv",
    log:
        "logs/teacher/teacher.log",
    benchmark:
        "benchmarks/teacher/teacher.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=GPUS,
    params:
        config_keys=config_keys("seed", "dataset", "teacher"),
    script:
        "../scripts/teacher.py"
