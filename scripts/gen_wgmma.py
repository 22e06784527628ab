#!/usr/bin/env python3
# Emits the `Wg<T>` wgmma wrappers of src/ops/dilated/hopper.cu (the operand lists of
# m64nNk16 are too long to write by hand). Usage: python3 scripts/gen_wgmma.py, then paste
# the output between the GENERATED markers of hopper.cu.
def regs(n, start=0):
    return ",".join(f"%{i}" for i in range(start, start + n))
def outs(n):
    return ", ".join(f'"+f"(d[{i}])' for i in range(n))
out = []
for T, ty in (("bf16", "bf16"), ("f16", "f16")):
    out.append(f"template <> struct Wg<{T}> {{")
    for N in (64, 128):
        nr = N // 2
        # SS: A and B from shared memory (K-major both), scale-d from `acc`.
        out.append(f"    // D[64x{N}] (+)= A(smem, K-major) * B(smem, K-major)^T")
        out.append(f"    __device__ __forceinline__ static void ss{N}(float (&d)[{nr}], u64 da, u64 db, int acc) {{")
        out.append(f'        asm volatile(')
        out.append(f'            "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nr+2}, 0;\\n"')
        out.append(f'            "wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{ty}.{ty} "')
        out.append(f'            "{{{regs(nr)}}}, "')
        out.append(f'            "%{nr}, %{nr+1}, p, 1, 1, 0, 0;\\n}}\\n"')
        out.append(f'            : {outs(nr)}')
        out.append(f'            : "l"(da), "l"(db), "r"(acc));')
        out.append("    }")
        # SS with both operands MN-major (transposed): D = A(smem, MN-major) * B(smem, MN-major).
        out.append(f"    // D[64x{N}] (+)= A(smem, MN-major) * B(smem, MN-major)")
        out.append(f"    __device__ __forceinline__ static void ss{N}t(float (&d)[{nr}], u64 da, u64 db, int acc) {{")
        out.append(f'        asm volatile(')
        out.append(f'            "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nr+2}, 0;\\n"')
        out.append(f'            "wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{ty}.{ty} "')
        out.append(f'            "{{{regs(nr)}}}, "')
        out.append(f'            "%{nr}, %{nr+1}, p, 1, 1, 1, 1;\\n}}\\n"')
        out.append(f'            : {outs(nr)}')
        out.append(f'            : "l"(da), "l"(db), "r"(acc));')
        out.append("    }")
        # RS: A from registers, B from shared memory MN-major (transposed), accumulate.
        out.append(f"    // D[64x{N}] += A(registers) * B(smem, MN-major)")
        out.append(f"    __device__ __forceinline__ static void rs{N}(float (&d)[{nr}], const u32 (&a)[4], u64 db) {{")
        out.append(f'        asm volatile(')
        out.append(f'            "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nr+5}, 0;\\n"')
        out.append(f'            "wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{ty}.{ty} "')
        out.append(f'            "{{{regs(nr)}}}, "')
        out.append(f'            "{{%{nr},%{nr+1},%{nr+2},%{nr+3}}}, %{nr+4}, p, 1, 1, 1;\\n}}\\n"')
        out.append(f'            : {outs(nr)}')
        out.append(f'            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));')
        out.append("    }")
    out.append("};")
print("\n".join(out))
