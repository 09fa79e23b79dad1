"""`radloop flows serve`: serve radloop's Prefect deployments and their event triggers."""

from __future__ import annotations

import os

import typer

from radloop.cli_common import cli_model_specs, cli_settings

flows_app = typer.Typer(help="Prefect flows and their deployments.", no_args_is_help=True)

DEPLOYMENT = "annotate-study/on-study-completed"


@flows_app.command("serve")
def serve(
    limit: int = typer.Option(2, min=1, help="Annotation flow runs at once."),
) -> None:
    """Serve `annotate-study`, triggered by every radloop.study.completed event."""
    settings = cli_settings()
    cli_model_specs(settings)  # refuse to serve with a broken spec
    os.environ["PREFECT_API_URL"] = settings.prefect.effective_api_url
    from prefect.events import DeploymentEventTrigger
    from prefect.types.entrypoint import EntrypointType

    from flows.annotate import annotate_study

    annotate_study.serve(
        name="on-study-completed",
        triggers=[
            DeploymentEventTrigger(
                expect={"radloop.study.completed"},
                match={"prefect.resource.id": "radloop.study.*"},
                parameters={
                    "study_uid": "{{ event.payload.study_uid }}",
                    "revision": "{{ event.payload.revision }}",
                },
            )
        ],
        global_limit=limit,
        limit=limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
        print_starting_message=False,
    )
