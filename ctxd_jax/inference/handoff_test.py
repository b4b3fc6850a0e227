"""Policy versions of the weight hand-off, against an in-process fake of the client (real servers:
tests/test_inference.py)."""

import asyncio
import os

from ctxd_jax.inference.handoff import Publisher


class FakeClient:
    def __init__(self, loaded=()):
        self.loaded = dict.fromkeys(loaded, "elsewhere")

    async def models(self):
        return ["base", *self.loaded]

    async def load_adapter(self, name, path):
        assert name not in self.loaded, f"{name} loaded twice"
        self.loaded[name] = path

    async def unload_adapter(self, name):
        del self.loaded[name]


def test_each_version_its_own_name_and_folder_until_retired(tmp_path):
    client = FakeClient(loaded=["student-v1"])  # left by an earlier run on the same server
    pub = Publisher([client], str(tmp_path), lambda path: open(os.path.join(path, "w"), "w").close(), merged=False,
                    prefix="student", base_name="base")

    async def go():
        for v in range(4):
            await pub.publish(v)
        return await pub.retire(keep={1})

    assert asyncio.run(go()) == [0, 2]
    assert sorted(client.loaded) == ["student-v1", "student-v3"] and pub.latest == 3
    assert client.loaded["student-v3"] == pub.path(3) and sorted(os.listdir(tmp_path)) == ["step_000001", "step_000003"]
    assert asyncio.run(pub.retire(keep=())) == [1]  # the latest always stays
    assert pub.model(3) == "student-v3"
    merged = Publisher([], str(tmp_path), print, merged=True, prefix="student", base_name="base")
    assert merged.model(3) == "base"
