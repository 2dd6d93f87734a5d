// The step buffer: what changes from one forward pass to the next, written by the host before
// each pass, so that every other parameter and binding of a pass stays the same from step to
// step. Word 0: the tokens already in the KV cache; from word 1: the ids of the new tokens.
const STEP_PAST: u32 = 0u;
const STEP_TOKENS: u32 = 1u;
