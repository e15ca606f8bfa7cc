"""Galaxy job runner plugin for k8s-job-worker.

``k8s_job_worker_galaxy.runner:K8sJobWorkerJobRunner`` is the runner to load from Galaxy's
``job_conf.yml``; ``messages`` builds requests and reads events (pure), ``tracking`` keeps
the runner's jobs and seen events, ``amqp`` talks to RabbitMQ with kombu.
"""

__version__ = "0.1.0"
