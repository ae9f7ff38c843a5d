"""Fill the demo database with users, providers, models and flows (once)."""

from django.contrib.auth.hashers import make_password
from django.core.management.base import BaseCommand
from django.db import transaction

from demo_project.demo.factories import (
    FlowInstanceFactory,
    GlobalModelFactory,
    ModelFactory,
    ProviderFactory,
    UserFactory,
)
from demo_project.demo.models import FlowInstance, GlobalModel, Model, Provider, User

PROVIDERS = [
    ("openai", "OpenAI"),
    ("anthropic", "Anthropic"),
    ("google", "Google"),
    ("mistral", "Mistral AI"),
    ("deepseek", "DeepSeek"),
]

GLOBAL_MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3",
    "o4-mini",
    "claude-opus-4",
    "claude-sonnet-4",
    "claude-haiku-3.5",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.0-flash",
    "mistral-large",
    "mistral-small",
    "codestral",
    "deepseek-chat",
    "deepseek-reasoner",
    "llama-3.3-70b",
    "qwen-2.5-72b",
    "text-embedding-3-small",
]

BATCH_SIZE = 500


class Command(BaseCommand):
    help = "Load demo data (users, providers, models, flows). Does nothing if it is already there."

    def add_arguments(self, parser):
        parser.add_argument("--users", type=int, default=1000)
        parser.add_argument("--flows", type=int, default=1000)

    def handle(self, *args, users: int, flows: int, **options):
        if GlobalModel.objects.exists():
            self.stdout.write(f"Demo data already loaded ({self._counts()}); nothing to do.")
            return
        with transaction.atomic():
            self._load(users, flows)
        self.stdout.write(self.style.SUCCESS(f"Loaded demo data: {self._counts()}."))

    def _load(self, users: int, flows: int) -> None:
        # One hash for everyone: hashing a thousand passwords would take minutes.
        # (password=None makes the factory skip its own hashing.)
        password = make_password("password")
        people = UserFactory.build_batch(users, password=None)
        for i, person in enumerate(people):
            person.password = password
            if i % 100 == 0:
                person.role = User.Role.ADMIN
        User.objects.bulk_create(people, batch_size=BATCH_SIZE)

        providers = Provider.objects.bulk_create(
            [ProviderFactory.build(name=name, display_name=label) for name, label in PROVIDERS]
        )
        global_models = GlobalModel.objects.bulk_create(
            [
                GlobalModelFactory.build(name=name, display_name=name.upper())
                for name in GLOBAL_MODELS
            ]
        )

        offers = []
        for i, global_model in enumerate(global_models):
            # Every global model is served by two or three providers.
            served_by = {i % len(providers), (i + 2) % len(providers)}
            if i % 3 == 0:
                served_by.add((i + 4) % len(providers))
            for p in sorted(served_by):
                offers.append(
                    ModelFactory.build(
                        provider=providers[p],
                        global_model=global_model,
                        provider_model_name=f"{providers[p].name}/{global_model.name}",
                    )
                )
        Model.objects.bulk_create(offers, batch_size=BATCH_SIZE)

        FlowInstance.objects.bulk_create(
            FlowInstanceFactory.build_batch(flows), batch_size=BATCH_SIZE
        )

    def _counts(self) -> str:
        return (
            f"{User.objects.count()} users, {Provider.objects.count()} providers, "
            f"{GlobalModel.objects.count()} global models, "
            f"{Model.objects.count()} provider models, "
            f"{FlowInstance.objects.count()} flows in "
            f"{FlowInstance.objects.values('tenant_id').distinct().count()} tenants"
        )
