// What the scenarios share: how an error is reported to the Rust side.

/** An error's class, SQLSTATE and text (what the Rust side asserts on). */
export function describe(e) {
  return {
    name: e?.name ?? null,
    code: e?.code ?? null,
    message: String(e?.message ?? e),
    source: e?.sourceError ? String(e.sourceError) : null,
  };
}

/** Runs `f`, which must fail: its error described, or a note that it did not. */
export async function failure(f) {
  try {
    const value = await f();
    return { unexpected_success: JSON.stringify(value) ?? null };
  } catch (e) {
    return describe(e);
  }
}
