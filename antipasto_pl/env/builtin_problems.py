"""The built-in LeetCode-style problem set, as compact specs turned into `Problem`s by `problems.builtin_problems`.

Each spec is (id, task text, method signature, method body, worked example, held tests). Everything is
plain data so the set can be hashed and serialised; every argument and expected value is JSON-compatible
(lists, not tuples) because the strict oracle compares types exactly. Solutions never mutate their inputs.
"""

from __future__ import annotations

from typing import NamedTuple


class Case(NamedTuple):
    """Positional arguments and the expected return value of one call."""

    args: tuple
    out: object


def _t(*args: object, out: object) -> Case:
    return Case(args, out)


class Spec(NamedTuple):
    id: str
    text: str
    signature: str
    body: str
    example: Case
    tests: tuple[Case, ...]
    float_tol: float | None = None


SPECS: tuple[Spec, ...] = (
    Spec(
        "two_sum",
        "Given a list of integers `nums` and an integer `target`, return the indices `[i, j]` (i < j) of "
        "the two numbers that add up to `target`. Exactly one such pair exists.",
        "two_sum(self, nums: list[int], target: int) -> list[int]",
        """
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
        return []
        """,
        _t([2, 7, 11, 15], 9, out=[0, 1]),
        (_t([3, 2, 4], 6, out=[1, 2]), _t([3, 3], 6, out=[0, 1]), _t([-1, -2, -3, -4, -5], -8, out=[2, 4]),
         _t([0, 4, 3, 0], 0, out=[0, 3])),
    ),
    Spec(
        "valid_parentheses",
        "Given a string `s` containing only the characters '()[]{}', return True if every bracket is closed "
        "by the same type of bracket in the correct order, otherwise False.",
        "valid_parentheses(self, s: str) -> bool",
        """
        pairs = {')': '(', ']': '[', '}': '{'}
        stack = []
        for ch in s:
            if ch in pairs:
                if not stack or stack.pop() != pairs[ch]:
                    return False
            else:
                stack.append(ch)
        return not stack
        """,
        _t("()[]{}", out=True),
        (_t("(]", out=False), _t("([{}])", out=True), _t("(((", out=False), _t("", out=True),
         _t("([)]", out=False)),
    ),
    Spec(
        "max_subarray",
        "Given a non-empty list of integers `nums`, return the largest sum of any contiguous non-empty subarray.",
        "max_subarray(self, nums: list[int]) -> int",
        """
        best = current = nums[0]
        for x in nums[1:]:
            current = max(x, current + x)
            best = max(best, current)
        return best
        """,
        _t([-2, 1, -3, 4, -1, 2, 1, -5, 4], out=6),
        (_t([1], out=1), _t([5, 4, -1, 7, 8], out=23), _t([-3, -1, -2], out=-1), _t([2, -1, 2, -1, 2], out=4)),
    ),
    Spec(
        "is_anagram",
        "Given two strings `s` and `t`, return True if `t` is an anagram of `s` (same letters with the same "
        "counts), otherwise False.",
        "is_anagram(self, s: str, t: str) -> bool",
        """
        counts = {}
        for ch in s:
            counts[ch] = counts.get(ch, 0) + 1
        for ch in t:
            counts[ch] = counts.get(ch, 0) - 1
        return all(v == 0 for v in counts.values())
        """,
        _t("anagram", "nagaram", out=True),
        (_t("rat", "car", out=False), _t("", "", out=True), _t("ab", "a", out=False), _t("listen", "silent", out=True),
         _t("aacc", "ccac", out=False)),
    ),
    Spec(
        "climb_stairs",
        "You climb a staircase of `n` steps, taking 1 or 2 steps at a time. Return the number of distinct "
        "ways to reach the top.",
        "climb_stairs(self, n: int) -> int",
        """
        a, b = 1, 1
        for _ in range(n):
            a, b = b, a + b
        return a
        """,
        _t(3, out=3),
        (_t(1, out=1), _t(2, out=2), _t(5, out=8), _t(10, out=89), _t(0, out=1)),
    ),
    Spec(
        "merge_intervals",
        "Given a list of intervals `[start, end]`, merge all overlapping (or touching) intervals and return "
        "the merged intervals sorted by start.",
        "merge_intervals(self, intervals: list[list[int]]) -> list[list[int]]",
        """
        merged = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return merged
        """,
        _t([[1, 3], [2, 6], [8, 10], [15, 18]], out=[[1, 6], [8, 10], [15, 18]]),
        (_t([[1, 4], [4, 5]], out=[[1, 5]]), _t([[5, 7], [1, 2]], out=[[1, 2], [5, 7]]),
         _t([[1, 10], [2, 3], [4, 5]], out=[[1, 10]]), _t([], out=[])),
    ),
    Spec(
        "roman_to_int",
        "Convert a Roman numeral string `s` (symbols I, V, X, L, C, D, M with subtractive notation such as "
        "IV and CM) to an integer.",
        "roman_to_int(self, s: str) -> int",
        """
        values = {'I': 1, 'V': 5, 'X': 10, 'L': 50, 'C': 100, 'D': 500, 'M': 1000}
        total = 0
        for i, ch in enumerate(s):
            if i + 1 < len(s) and values[ch] < values[s[i + 1]]:
                total -= values[ch]
            else:
                total += values[ch]
        return total
        """,
        _t("LVIII", out=58),
        (_t("III", out=3), _t("MCMXCIV", out=1994), _t("IV", out=4), _t("CDXLIV", out=444)),
    ),
    Spec(
        "daily_temperatures",
        "Given a list of daily temperatures, return a list where entry i is the number of days after day i "
        "until a warmer temperature, or 0 if there is none.",
        "daily_temperatures(self, temperatures: list[int]) -> list[int]",
        """
        answer = [0] * len(temperatures)
        stack = []
        for i, temp in enumerate(temperatures):
            while stack and temperatures[stack[-1]] < temp:
                j = stack.pop()
                answer[j] = i - j
            stack.append(i)
        return answer
        """,
        _t([73, 74, 75, 71, 69, 72, 76, 73], out=[1, 1, 4, 2, 1, 1, 0, 0]),
        (_t([30, 40, 50, 60], out=[1, 1, 1, 0]), _t([30, 60, 90], out=[1, 1, 0]), _t([50, 40, 30], out=[0, 0, 0]),
         _t([70, 70, 71], out=[2, 1, 0])),
    ),
    Spec(
        "coin_change",
        "Given coin denominations `coins` (unlimited supply of each) and an `amount`, return the fewest "
        "coins that sum to `amount`, or -1 if it cannot be made.",
        "coin_change(self, coins: list[int], amount: int) -> int",
        """
        inf = amount + 1
        best = [0] + [inf] * amount
        for value in range(1, amount + 1):
            for coin in coins:
                if coin <= value:
                    best[value] = min(best[value], best[value - coin] + 1)
        return best[amount] if best[amount] != inf else -1
        """,
        _t([1, 2, 5], 11, out=3),
        (_t([2], 3, out=-1), _t([1], 0, out=0), _t([1, 3, 4], 6, out=2), _t([186, 419, 83, 408], 6249, out=20)),
    ),
    Spec(
        "longest_common_prefix",
        "Return the longest common prefix of the list of strings `strs`, or the empty string if there is none.",
        "longest_common_prefix(self, strs: list[str]) -> str",
        """
        if not strs:
            return ''
        prefix = strs[0]
        for word in strs[1:]:
            while not word.startswith(prefix):
                prefix = prefix[:-1]
        return prefix
        """,
        _t(["flower", "flow", "flight"], out="fl"),
        (_t(["dog", "racecar", "car"], out=""), _t(["alone"], out="alone"), _t(["ab", "abc", "abd"], out="ab"),
         _t([], out="")),
    ),
    Spec(
        "single_number",
        "Every element of the non-empty list `nums` appears exactly twice except one. Return that single one.",
        "single_number(self, nums: list[int]) -> int",
        """
        result = 0
        for x in nums:
            result ^= x
        return result
        """,
        _t([4, 1, 2, 1, 2], out=4),
        (_t([2, 2, 1], out=1), _t([1], out=1), _t([-3, 7, 7], out=-3), _t([0, 5, 5, 9, 9], out=0)),
    ),
    Spec(
        "spiral_order",
        "Given an m x n matrix (a list of rows), return all of its elements in clockwise spiral order starting "
        "from the top-left corner.",
        "spiral_order(self, matrix: list[list[int]]) -> list[int]",
        """
        result = []
        rows = [list(row) for row in matrix]
        while rows:
            result.extend(rows.pop(0))
            rows = [list(col) for col in zip(*rows)][::-1]
        return result
        """,
        _t([[1, 2, 3], [4, 5, 6], [7, 8, 9]], out=[1, 2, 3, 6, 9, 8, 7, 4, 5]),
        (_t([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], out=[1, 2, 3, 4, 8, 12, 11, 10, 9, 5, 6, 7]),
         _t([[7]], out=[7]), _t([[1, 2], [3, 4], [5, 6]], out=[1, 2, 4, 6, 5, 3]), _t([], out=[])),
    ),
    Spec(
        "reverse_words",
        "Given a string `s`, return the words in reverse order joined by single spaces. Words are separated "
        "by one or more spaces; leading and trailing spaces are dropped.",
        "reverse_words(self, s: str) -> str",
        """
        return ' '.join(reversed(s.split()))
        """,
        _t("the sky is blue", out="blue is sky the"),
        (_t("  hello world  ", out="world hello"), _t("a good   example", out="example good a"), _t("one", out="one"),
         _t("   ", out="")),
    ),
    Spec(
        "house_robber",
        "Houses in a row hold `nums[i]` money. Robbing two adjacent houses alerts the police. Return the "
        "maximum amount you can rob.",
        "house_robber(self, nums: list[int]) -> int",
        """
        take, skip = 0, 0
        for x in nums:
            take, skip = skip + x, max(take, skip)
        return max(take, skip)
        """,
        _t([2, 7, 9, 3, 1], out=12),
        (_t([1, 2, 3, 1], out=4), _t([], out=0), _t([5], out=5), _t([2, 1, 1, 2], out=4)),
    ),
    Spec(
        "count_primes",
        "Return the number of prime numbers strictly less than the non-negative integer `n`.",
        "count_primes(self, n: int) -> int",
        """
        if n < 3:
            return 0
        sieve = [True] * n
        sieve[0] = sieve[1] = False
        for i in range(2, int(n ** 0.5) + 1):
            if sieve[i]:
                sieve[i * i::i] = [False] * len(range(i * i, n, i))
        return sum(sieve)
        """,
        _t(10, out=4),
        (_t(0, out=0), _t(2, out=0), _t(3, out=1), _t(100, out=25), _t(30, out=10)),
    ),
    Spec(
        "binary_search",
        "Given a sorted list of distinct integers `nums` and a `target`, return the index of `target`, or -1 "
        "if it is absent. Use O(log n) time.",
        "binary_search(self, nums: list[int], target: int) -> int",
        """
        lo, hi = 0, len(nums) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if nums[mid] == target:
                return mid
            if nums[mid] < target:
                lo = mid + 1
            else:
                hi = mid - 1
        return -1
        """,
        _t([-1, 0, 3, 5, 9, 12], 9, out=4),
        (_t([-1, 0, 3, 5, 9, 12], 2, out=-1), _t([5], 5, out=0), _t([], 1, out=-1), _t([1, 3, 5, 7], 1, out=0)),
    ),
    Spec(
        "eval_rpn",
        "Evaluate an arithmetic expression in Reverse Polish Notation given as a list of tokens. Operators are "
        "+, -, *, /; division truncates toward zero.",
        "eval_rpn(self, tokens: list[str]) -> int",
        """
        stack = []
        for tok in tokens:
            if tok in ('+', '-', '*', '/'):
                b, a = stack.pop(), stack.pop()
                if tok == '+':
                    stack.append(a + b)
                elif tok == '-':
                    stack.append(a - b)
                elif tok == '*':
                    stack.append(a * b)
                else:
                    stack.append(int(a / b))
            else:
                stack.append(int(tok))
        return stack[0]
        """,
        _t(["2", "1", "+", "3", "*"], out=9),
        (_t(["4", "13", "5", "/", "+"], out=6),
         _t(["10", "6", "9", "3", "+", "-11", "*", "/", "*", "17", "+", "5", "+"], out=22), _t(["7"], out=7),
         _t(["3", "-4", "-"], out=7)),
    ),
    Spec(
        "length_of_longest_substring",
        "Return the length of the longest substring of `s` that contains no repeated characters.",
        "length_of_longest_substring(self, s: str) -> int",
        """
        last = {}
        start = best = 0
        for i, ch in enumerate(s):
            if ch in last and last[ch] >= start:
                start = last[ch] + 1
            last[ch] = i
            best = max(best, i - start + 1)
        return best
        """,
        _t("abcabcbb", out=3),
        (_t("bbbbb", out=1), _t("pwwkew", out=3), _t("", out=0), _t("abba", out=2), _t("dvdf", out=3)),
    ),
    Spec(
        "unique_paths",
        "A robot on an m x n grid starts at the top-left and may only move right or down. Return the number "
        "of distinct paths to the bottom-right corner.",
        "unique_paths(self, m: int, n: int) -> int",
        """
        row = [1] * n
        for _ in range(1, m):
            for j in range(1, n):
                row[j] += row[j - 1]
        return row[-1]
        """,
        _t(3, 7, out=28),
        (_t(3, 2, out=3), _t(1, 1, out=1), _t(7, 3, out=28), _t(10, 10, out=48620)),
    ),
    Spec(
        "fizz_buzz",
        "Return the list of strings for 1..n where multiples of 3 are 'Fizz', multiples of 5 are 'Buzz', "
        "multiples of both are 'FizzBuzz', and other numbers are their decimal string.",
        "fizz_buzz(self, n: int) -> list[str]",
        """
        out = []
        for i in range(1, n + 1):
            word = ('Fizz' if i % 3 == 0 else '') + ('Buzz' if i % 5 == 0 else '')
            out.append(word or str(i))
        return out
        """,
        _t(5, out=["1", "2", "Fizz", "4", "Buzz"]),
        (_t(1, out=["1"]), _t(0, out=[]),
         _t(15, out=["1", "2", "Fizz", "4", "Buzz", "Fizz", "7", "8", "Fizz", "Buzz", "11", "Fizz", "13", "14",
                     "FizzBuzz"])),
    ),
    Spec(
        "count_bits",
        "Given a non-negative integer `n`, return a list of length n + 1 whose entry i is the number of 1 "
        "bits in the binary representation of i.",
        "count_bits(self, n: int) -> list[int]",
        """
        bits = [0] * (n + 1)
        for i in range(1, n + 1):
            bits[i] = bits[i >> 1] + (i & 1)
        return bits
        """,
        _t(5, out=[0, 1, 1, 2, 1, 2]),
        (_t(0, out=[0]), _t(2, out=[0, 1, 1]), _t(8, out=[0, 1, 1, 2, 1, 2, 2, 3, 1])),
    ),
    Spec(
        "rotate_matrix",
        "Given an n x n matrix (a list of rows), return a new matrix rotated 90 degrees clockwise.",
        "rotate_matrix(self, matrix: list[list[int]]) -> list[list[int]]",
        """
        return [list(row) for row in zip(*matrix[::-1])]
        """,
        _t([[1, 2, 3], [4, 5, 6], [7, 8, 9]], out=[[7, 4, 1], [8, 5, 2], [9, 6, 3]]),
        (_t([[1]], out=[[1]]), _t([[1, 2], [3, 4]], out=[[3, 1], [4, 2]]),
         _t([[5, 1, 9, 11], [2, 4, 8, 10], [13, 3, 6, 7], [15, 14, 12, 16]],
            out=[[15, 13, 2, 5], [14, 3, 4, 1], [12, 6, 8, 9], [16, 7, 10, 11]])),
    ),
    Spec(
        "majority_element",
        "Return the element that appears more than n / 2 times in the list `nums` of length n (it always exists).",
        "majority_element(self, nums: list[int]) -> int",
        """
        candidate, count = None, 0
        for x in nums:
            if count == 0:
                candidate = x
            count += 1 if x == candidate else -1
        return candidate
        """,
        _t([2, 2, 1, 1, 1, 2, 2], out=2),
        (_t([3, 2, 3], out=3), _t([1], out=1), _t([6, 5, 5], out=5), _t([-1, -1, 4, -1, 4], out=-1)),
    ),
    Spec(
        "product_except_self",
        "Given a list `nums`, return a list where entry i is the product of all elements except `nums[i]`, "
        "without using division.",
        "product_except_self(self, nums: list[int]) -> list[int]",
        """
        n = len(nums)
        out = [1] * n
        prefix = 1
        for i in range(n):
            out[i] = prefix
            prefix *= nums[i]
        suffix = 1
        for i in range(n - 1, -1, -1):
            out[i] *= suffix
            suffix *= nums[i]
        return out
        """,
        _t([1, 2, 3, 4], out=[24, 12, 8, 6]),
        (_t([-1, 1, 0, -3, 3], out=[0, 0, 9, 0, 0]), _t([2, 3], out=[3, 2]), _t([5, 0, 0], out=[0, 0, 0]),
         _t([1, 1, 1], out=[1, 1, 1])),
    ),
    Spec(
        "is_palindrome",
        "Return True if the string `s` reads the same forwards and backwards after lower-casing it and "
        "removing every non-alphanumeric character, otherwise False.",
        "is_palindrome(self, s: str) -> bool",
        """
        cleaned = [ch.lower() for ch in s if ch.isalnum()]
        return cleaned == cleaned[::-1]
        """,
        _t("A man, a plan, a canal: Panama", out=True),
        (_t("race a car", out=False), _t(" ", out=True), _t("0P", out=False), _t("No 'x' in Nixon", out=True)),
    ),
    Spec(
        "longest_increasing_subsequence",
        "Return the length of the longest strictly increasing subsequence of the list `nums`.",
        "longest_increasing_subsequence(self, nums: list[int]) -> int",
        """
        import bisect
        tails = []
        for x in nums:
            i = bisect.bisect_left(tails, x)
            if i == len(tails):
                tails.append(x)
            else:
                tails[i] = x
        return len(tails)
        """,
        _t([10, 9, 2, 5, 3, 7, 101, 18], out=4),
        (_t([0, 1, 0, 3, 2, 3], out=4), _t([7, 7, 7, 7], out=1), _t([], out=0), _t([4, 10, 4, 3, 8, 9], out=3)),
    ),
    Spec(
        "int_to_roman",
        "Convert an integer `num` between 1 and 3999 to a Roman numeral string, using subtractive notation "
        "(IV, IX, XL, XC, CD, CM).",
        "int_to_roman(self, num: int) -> str",
        """
        table = [(1000, 'M'), (900, 'CM'), (500, 'D'), (400, 'CD'), (100, 'C'), (90, 'XC'),
                 (50, 'L'), (40, 'XL'), (10, 'X'), (9, 'IX'), (5, 'V'), (4, 'IV'), (1, 'I')]
        out = []
        for value, symbol in table:
            count, num = divmod(num, value)
            out.append(symbol * count)
        return ''.join(out)
        """,
        _t(58, out="LVIII"),
        (_t(3, out="III"), _t(1994, out="MCMXCIV"), _t(3999, out="MMMCMXCIX"), _t(444, out="CDXLIV")),
    ),
    Spec(
        "min_meeting_rooms",
        "Given meeting time intervals `[start, end]` (a meeting ending at t frees its room for one starting "
        "at t), return the minimum number of rooms required.",
        "min_meeting_rooms(self, intervals: list[list[int]]) -> int",
        """
        events = []
        for start, end in intervals:
            events.append((start, 1))
            events.append((end, -1))
        rooms = best = 0
        for _, delta in sorted(events):
            rooms += delta
            best = max(best, rooms)
        return best
        """,
        _t([[0, 30], [5, 10], [15, 20]], out=2),
        (_t([[7, 10], [2, 4]], out=1), _t([], out=0), _t([[1, 5], [5, 10]], out=1),
         _t([[1, 10], [2, 9], [3, 8], [9, 12]], out=3)),
    ),
    Spec(
        "remove_adjacent_duplicates",
        "Repeatedly remove pairs of equal adjacent letters from the string `s` until none remain, and return "
        "the final string.",
        "remove_adjacent_duplicates(self, s: str) -> str",
        """
        stack = []
        for ch in s:
            if stack and stack[-1] == ch:
                stack.pop()
            else:
                stack.append(ch)
        return ''.join(stack)
        """,
        _t("abbaca", out="ca"),
        (_t("azxxzy", out="ay"), _t("aa", out=""), _t("abc", out="abc"), _t("aaa", out="a")),
    ),
    Spec(
        "group_anagrams",
        "Group the words in `strs` that are anagrams of each other. Return the groups with the words inside "
        "each group sorted, and the groups sorted by their first word.",
        "group_anagrams(self, strs: list[str]) -> list[list[str]]",
        """
        groups = {}
        for word in strs:
            groups.setdefault(''.join(sorted(word)), []).append(word)
        return sorted(sorted(group) for group in groups.values())
        """,
        _t(["eat", "tea", "tan", "ate", "nat", "bat"], out=[["ate", "eat", "tea"], ["bat"], ["nat", "tan"]]),
        (_t([""], out=[[""]]), _t(["a"], out=[["a"]]),
         _t(["ab", "ba", "abc", "cab", "x"], out=[["ab", "ba"], ["abc", "cab"], ["x"]]), _t([], out=[])),
    ),
    Spec(
        "edit_distance",
        "Return the minimum number of single-character insertions, deletions or substitutions needed to turn "
        "`word1` into `word2`.",
        "edit_distance(self, word1: str, word2: str) -> int",
        """
        prev = list(range(len(word2) + 1))
        for i, a in enumerate(word1, 1):
            cur = [i]
            for j, b in enumerate(word2, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
            prev = cur
        return prev[-1]
        """,
        _t("horse", "ros", out=3),
        (_t("intention", "execution", out=5), _t("", "abc", out=3), _t("same", "same", out=0), _t("ab", "ba", out=2)),
    ),
    Spec(
        "reverse_integer",
        "Reverse the decimal digits of the integer `x`, keeping its sign. If the result falls outside the "
        "signed 32-bit range [-2**31, 2**31 - 1], return 0.",
        "reverse_integer(self, x: int) -> int",
        """
        sign = -1 if x < 0 else 1
        result = sign * int(str(abs(x))[::-1])
        return result if -2 ** 31 <= result <= 2 ** 31 - 1 else 0
        """,
        _t(123, out=321),
        (_t(-123, out=-321), _t(120, out=21), _t(0, out=0), _t(1534236469, out=0)),
    ),
    Spec(
        "hamming_distance",
        "Return the number of bit positions at which the non-negative integers `x` and `y` differ.",
        "hamming_distance(self, x: int, y: int) -> int",
        """
        return bin(x ^ y).count('1')
        """,
        _t(1, 4, out=2),
        (_t(3, 1, out=1), _t(0, 0, out=0), _t(255, 0, out=8), _t(93, 73, out=2)),
    ),
    Spec(
        "num_islands",
        "Given a grid of '1' (land) and '0' (water) strings, return the number of islands: groups of land "
        "cells connected horizontally or vertically.",
        "num_islands(self, grid: list[list[str]]) -> int",
        """
        rows, cols = len(grid), len(grid[0]) if grid else 0
        seen = set()
        count = 0
        for r in range(rows):
            for c in range(cols):
                if grid[r][c] != '1' or (r, c) in seen:
                    continue
                count += 1
                stack = [(r, c)]
                seen.add((r, c))
                while stack:
                    y, x = stack.pop()
                    for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= ny < rows and 0 <= nx < cols and grid[ny][nx] == '1' and (ny, nx) not in seen:
                            seen.add((ny, nx))
                            stack.append((ny, nx))
        return count
        """,
        _t([["1", "1", "0", "0"], ["1", "0", "0", "1"], ["0", "0", "1", "1"]], out=2),
        (_t([["1", "1", "1"], ["0", "1", "0"], ["1", "1", "1"]], out=1),
         _t([["1", "0", "1"], ["0", "1", "0"], ["1", "0", "1"]], out=5), _t([["0"]], out=0), _t([], out=0)),
    ),
    Spec(
        "top_k_frequent",
        "Return the `k` most frequent values in `nums`, most frequent first; ties are broken by the smaller "
        "value first.",
        "top_k_frequent(self, nums: list[int], k: int) -> list[int]",
        """
        counts = {}
        for x in nums:
            counts[x] = counts.get(x, 0) + 1
        return sorted(counts, key=lambda x: (-counts[x], x))[:k]
        """,
        _t([1, 1, 1, 2, 2, 3], 2, out=[1, 2]),
        (_t([1], 1, out=[1]), _t([4, 4, 5, 5, 6], 2, out=[4, 5]), _t([3, 0, 1, 0], 1, out=[0]),
         _t([7, 8, 9, 8, 7, 8], 3, out=[8, 7, 9])),
    ),
    Spec(
        "max_profit",
        "Given daily stock `prices`, return the maximum profit from one buy followed later by one sell, or 0 "
        "if no profit is possible.",
        "max_profit(self, prices: list[int]) -> int",
        """
        lowest = float('inf')
        best = 0
        for price in prices:
            lowest = min(lowest, price)
            best = max(best, price - lowest)
        return best
        """,
        _t([7, 1, 5, 3, 6, 4], out=5),
        (_t([7, 6, 4, 3, 1], out=0), _t([], out=0), _t([2, 4, 1, 7], out=6), _t([3, 3], out=0)),
    ),
    Spec(
        "can_jump",
        "Each entry of `nums` is the maximum jump length from that index. Starting at index 0, return True if "
        "you can reach the last index, otherwise False.",
        "can_jump(self, nums: list[int]) -> bool",
        """
        reach = 0
        for i, step in enumerate(nums):
            if i > reach:
                return False
            reach = max(reach, i + step)
        return True
        """,
        _t([2, 3, 1, 1, 4], out=True),
        (_t([3, 2, 1, 0, 4], out=False), _t([0], out=True), _t([1, 0, 1], out=False), _t([2, 0, 0], out=True)),
    ),
    Spec(
        "can_attend_meetings",
        "Given meeting intervals `[start, end]`, return True if one person can attend all of them (a meeting "
        "may start exactly when another ends), otherwise False.",
        "can_attend_meetings(self, intervals: list[list[int]]) -> bool",
        """
        ordered = sorted(intervals)
        return all(ordered[i][1] <= ordered[i + 1][0] for i in range(len(ordered) - 1))
        """,
        _t([[0, 30], [5, 10], [15, 20]], out=False),
        (_t([[7, 10], [2, 4]], out=True), _t([], out=True), _t([[1, 5], [5, 8]], out=True),
         _t([[5, 8], [1, 6]], out=False)),
    ),
    Spec(
        "merge_sorted_lists",
        "Merge the two sorted lists `a` and `b` into one sorted list.",
        "merge_sorted_lists(self, a: list[int], b: list[int]) -> list[int]",
        """
        i = j = 0
        out = []
        while i < len(a) and j < len(b):
            if a[i] <= b[j]:
                out.append(a[i])
                i += 1
            else:
                out.append(b[j])
                j += 1
        return out + a[i:] + b[j:]
        """,
        _t([1, 2, 4], [1, 3, 4], out=[1, 1, 2, 3, 4, 4]),
        (_t([], [], out=[]), _t([], [0], out=[0]), _t([5, 6], [1, 2, 3], out=[1, 2, 3, 5, 6]),
         _t([-2, 0], [-3, 7], out=[-3, -2, 0, 7])),
    ),
    Spec(
        "compress_string",
        "Run-length encode the string `s`: replace every maximal run of a repeated character by the character "
        "followed by the run length, omitting the length when it is 1.",
        "compress_string(self, s: str) -> str",
        """
        out = []
        i = 0
        while i < len(s):
            j = i
            while j < len(s) and s[j] == s[i]:
                j += 1
            out.append(s[i] + (str(j - i) if j - i > 1 else ''))
            i = j
        return ''.join(out)
        """,
        _t("aabccc", out="a2bc3"),
        (_t("", out=""), _t("abc", out="abc"), _t("zzzzzzzzzzzz", out="z12"), _t("aabbaa", out="a2b2a2")),
    ),
    Spec(
        "median_sorted_arrays",
        "Return the median (as a float) of the combined elements of the two sorted lists `a` and `b`, which "
        "are not both empty.",
        "median_sorted_arrays(self, a: list[int], b: list[int]) -> float",
        """
        merged = sorted(a + b)
        n = len(merged)
        if n % 2:
            return float(merged[n // 2])
        return (merged[n // 2 - 1] + merged[n // 2]) / 2
        """,
        _t([1, 3], [2], out=2.0),
        (_t([1, 2], [3, 4], out=2.5), _t([], [1], out=1.0), _t([0, 0], [0, 0], out=0.0), _t([-5, 3], [7], out=3.0),
         _t([1, 2, 3], [4, 5, 6], out=3.5)),
        float_tol=1e-6,
    ),
    Spec(
        "can_finish",
        "There are `n` courses labelled 0..n-1 and prerequisite pairs `[a, b]` meaning b must be taken before "
        "a. Return True if all courses can be finished (the prerequisites have no cycle), otherwise False.",
        "can_finish(self, n: int, prerequisites: list[list[int]]) -> bool",
        """
        indegree = [0] * n
        after = [[] for _ in range(n)]
        for a, b in prerequisites:
            after[b].append(a)
            indegree[a] += 1
        ready = [i for i in range(n) if indegree[i] == 0]
        done = 0
        while ready:
            course = ready.pop()
            done += 1
            for nxt in after[course]:
                indegree[nxt] -= 1
                if indegree[nxt] == 0:
                    ready.append(nxt)
        return done == n
        """,
        _t(2, [[1, 0]], out=True),
        (_t(2, [[1, 0], [0, 1]], out=False), _t(3, [], out=True), _t(4, [[1, 0], [2, 1], [3, 2], [1, 3]], out=False),
         _t(4, [[1, 0], [2, 0], [3, 1], [3, 2]], out=True)),
    ),
    Spec(
        "word_break",
        "Return True if the string `s` can be split into a sequence of one or more words from `words` "
        "(words may be reused), otherwise False.",
        "word_break(self, s: str, words: list[str]) -> bool",
        """
        vocab = set(words)
        ok = [True] + [False] * len(s)
        for end in range(1, len(s) + 1):
            ok[end] = any(ok[start] and s[start:end] in vocab for start in range(end))
        return ok[len(s)]
        """,
        _t("leetcode", ["leet", "code"], out=True),
        (_t("applepenapple", ["apple", "pen"], out=True),
         _t("catsandog", ["cats", "dog", "sand", "and", "cat"], out=False),
         _t("aaaaaaa", ["aaaa", "aaa"], out=True), _t("ab", ["a"], out=False)),
    ),
    Spec(
        "kth_largest",
        "Return the k-th largest element of the list `nums` (counting duplicates), where 1 <= k <= len(nums).",
        "kth_largest(self, nums: list[int], k: int) -> int",
        """
        import heapq
        heap = []
        for x in nums:
            heapq.heappush(heap, x)
            if len(heap) > k:
                heapq.heappop(heap)
        return heap[0]
        """,
        _t([3, 2, 1, 5, 6, 4], 2, out=5),
        (_t([3, 2, 3, 1, 2, 4, 5, 5, 6], 4, out=4), _t([1], 1, out=1), _t([-1, -1], 2, out=-1),
         _t([7, 10, 4], 3, out=4)),
    ),
    Spec(
        "three_sum",
        "Return all distinct triplets `[a, b, c]` of values from `nums` with a + b + c == 0, each triplet "
        "sorted ascending and the list of triplets sorted.",
        "three_sum(self, nums: list[int]) -> list[list[int]]",
        """
        values = sorted(nums)
        found = []
        for i in range(len(values)):
            if i and values[i] == values[i - 1]:
                continue
            lo, hi = i + 1, len(values) - 1
            while lo < hi:
                total = values[i] + values[lo] + values[hi]
                if total < 0:
                    lo += 1
                elif total > 0:
                    hi -= 1
                else:
                    found.append([values[i], values[lo], values[hi]])
                    lo += 1
                    while lo < hi and values[lo] == values[lo - 1]:
                        lo += 1
                    hi -= 1
        return found
        """,
        _t([-1, 0, 1, 2, -1, -4], out=[[-1, -1, 2], [-1, 0, 1]]),
        (_t([0, 1, 1], out=[]), _t([0, 0, 0, 0], out=[[0, 0, 0]]),
         _t([-2, 0, 1, 1, 2], out=[[-2, 0, 2], [-2, 1, 1]]), _t([], out=[])),
    ),
    Spec(
        "max_average_subarray",
        "Return the maximum average value (as a float) of any contiguous subarray of length exactly `k` in "
        "`nums`, where 1 <= k <= len(nums).",
        "max_average_subarray(self, nums: list[int], k: int) -> float",
        """
        window = sum(nums[:k])
        best = window
        for i in range(k, len(nums)):
            window += nums[i] - nums[i - k]
            best = max(best, window)
        return best / k
        """,
        _t([1, 12, -5, -6, 50, 3], 4, out=12.75),
        (_t([5], 1, out=5.0), _t([0, 4, 0, 3, 2], 1, out=4.0), _t([-1, -2, -3], 2, out=-1.5),
         _t([1, 2, 3, 4], 4, out=2.5)),
        float_tol=1e-6,
    ),
    Spec(
        "pascal_row",
        "Return row `n` (0-indexed) of Pascal's triangle as a list of integers.",
        "pascal_row(self, n: int) -> list[int]",
        """
        row = [1]
        for _ in range(n):
            row = [a + b for a, b in zip([0] + row, row + [0])]
        return row
        """,
        _t(3, out=[1, 3, 3, 1]),
        (_t(0, out=[1]), _t(1, out=[1, 1]), _t(5, out=[1, 5, 10, 10, 5, 1]), _t(6, out=[1, 6, 15, 20, 15, 6, 1])),
    ),
    Spec(
        "int_sqrt",
        "Return the floor of the square root of the non-negative integer `x`, without using a built-in "
        "exponent or square-root function.",
        "int_sqrt(self, x: int) -> int",
        """
        lo, hi = 0, x
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if mid * mid <= x:
                lo = mid
            else:
                hi = mid - 1
        return lo
        """,
        _t(8, out=2),
        (_t(4, out=2), _t(0, out=0), _t(1, out=1), _t(2147395599, out=46339), _t(99, out=9)),
    ),
)
